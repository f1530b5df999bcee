"""pp ops randaugment and random_erasing against torchvision's RandAugment and RandomErasing.

Measured (torchvision 0.29, torch 2.14 CPU, TF 2.21): every RandAugment op equals
torchvision's ``_apply_op`` pixel for pixel, eagerly and in a tf.data map, on 150 random
images of 1..320 pixels a side at random magnitudes; the tolerances below leave room for
the nearest-neighbour rounding of a grid coordinate at an exact tie (float32 sums in
another order on another CPU) and for a last-bit difference in the float32 blends.
"""

import math

import numpy as np
import pytest

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax.data import fake
from flowers_jax.data import pipeline
from flowers_jax.data import pp
from flowers_jax.data import randaugment as ra
from flowers_jax.data import transforms as tr

torch = pytest.importorskip('torch')
T = pytest.importorskip('torchvision.transforms')
autoaugment = pytest.importorskip('torchvision.transforms.autoaugment')
tf = pipeline.import_tf()

HW = (37, 53)  # odd sides: centres fall on half pixels
GEOMETRIC = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
BLENDS = ('Brightness', 'Color', 'Contrast', 'Sharpness', 'AutoContrast')  # float32, truncated
# Per op: (max grey-level difference, max fraction of differing pixels) allowed; measured 0, 0.
TOLERANCE = {**{name: (255, 0.002) for name in GEOMETRIC},  # a moved pixel can be any level
             **{name: (1, 0.001) for name in BLENDS}}
EXACT = (0, 0.0)  # Identity, Posterize, Solarize, Equalize: integer arithmetic
MAGNITUDES = {  # RandAugment's values at bins 3, 9, 27, 30 of 31 and others, signed
    'Identity': [0.0],
    'ShearX': [0.03, -0.09, 0.27, -0.3, 0.123],
    'ShearY': [0.03, -0.09, 0.27, -0.3, -0.123],
    'TranslateX': [2.2, -7.3, 21.9, -24.0, 0.9],  # int(): towards zero
    'TranslateY': [1.5, -5.0, 15.1, -16.7, -0.9],
    'Rotate': [3.0, -9.0, 27.0, -30.0, 0.5],
    'Posterize': [8.0, 7.0, 6.0, 5.0, 4.0, 1.0],
    'Solarize': [255.0, 178.5, 127.5, 25.5, 0.0, 8.5],
    'AutoContrast': [0.0],
    'Equalize': [0.0],
    **{name: [0.09, -0.27, 0.81, -0.9, 0.5] for name in ('Brightness', 'Color', 'Contrast',
                                                           'Sharpness')},
}


def _images():
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:HW[0], :HW[1]]
  smooth = np.stack([x * 4 % 256, y * 6 % 256, (x + y) * 2 % 256], -1).astype(np.uint8)
  return [rng.integers(0, 256, HW + (3,), dtype=np.uint8),
          rng.integers(0, 256, HW[::-1] + (3,), dtype=np.uint8),
          (rng.integers(0, 5, HW + (3,)) * 50 + 20).astype(np.uint8),  # few levels
          smooth]


def _torch_op(image, name, magnitude):
  chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
  out = autoaugment._apply_op(chw, name, magnitude, interpolation=T.InterpolationMode.NEAREST,
                              fill=None)
  return out.permute(1, 2, 0).numpy()


def _in_tf_data(fn, *args):
  """fn(*args) traced in a tf.data map, as the input pipeline runs the ops."""
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(pipeline.graph_fn(fn))
  return next(iter(ds.as_numpy_iterator()))


def _map_pairs(fn, images, seeds):
  """[fn(image, seed)] for pairs, each image shape traced once in a tf.data map."""
  out = [None] * len(images)
  for shape in {im.shape for im in images}:
    rows = [k for k, im in enumerate(images) if im.shape == shape]
    ds = tf.data.Dataset.from_tensor_slices((np.stack([images[k] for k in rows]),
                                             tf.gather(seeds, rows)))
    for k, image in zip(rows, ds.map(pipeline.graph_fn(fn)).as_numpy_iterator()):
      out[k] = image
  return out


def _diff(a, b):
  """(max grey-level difference, fraction of pixels differing in any channel)."""
  d = np.abs(a.astype(int) - b.astype(int))
  return d.max(), (d.max(-1) > 0).mean()


@pytest.mark.parametrize('name', ra.NAMES)
def test_each_op_matches_torchvision(name):
  max_diff, max_frac = TOLERANCE.get(name, EXACT)
  changed = False
  for image in _images():
    for magnitude in MAGNITUDES[name]:
      ref = _torch_op(image, name, magnitude)
      mag = tf.constant(magnitude, tf.float64)
      for ours in (ra.OPS[name](tf.constant(image), mag).numpy(),
                   _in_tf_data(ra.OPS[name], tf.constant(image), mag)):
        assert ours.shape == image.shape and ours.dtype == np.uint8
        diff, frac = _diff(ours, ref)
        assert diff <= max_diff and frac <= max_frac, (name, magnitude, diff, frac)
      changed |= (ref != image).any()
  assert changed or name == 'Identity'  # the comparisons saw the op do something


def test_ops_keep_small_and_flat_images_like_torchvision():
  """Sides <= 2 (sharpness leaves them), a constant image (autocontrast, equalize)."""
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (2, 5, 3), dtype=np.uint8), np.full((6, 4, 3), 77, np.uint8),
            rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)]
  for image in images:
    for name in ra.NAMES:
      for magnitude in MAGNITUDES[name][:2]:
        ours = ra.OPS[name](tf.constant(image), tf.constant(magnitude, tf.float64)).numpy()
        np.testing.assert_array_equal(ours, _torch_op(image, name, magnitude), err_msg=name)


@pytest.mark.parametrize('hw', [HW, (224, 224), (331, 500)])
@pytest.mark.parametrize('bins', [2, 5, 10, 31])
def test_magnitude_table_matches_torchvision(hw, bins):
  space = T.RandAugment()._augmentation_space(bins, hw)
  assert tuple(space) == ra.NAMES
  assert tuple(signed for _, signed in space.values()) == ra.SIGNED
  for m in range(bins):
    want = [float(mags[m].item()) if mags.ndim > 0 else 0.0 for mags, _ in space.values()]
    ours = ra.magnitudes(tf.constant(hw), m, bins).numpy()
    np.testing.assert_array_equal(ours, want, err_msg=f'bin {m}')


def _seeds(n, base=0):
  return tf.random.experimental.stateless_split(tf.constant([base, 7], tf.int64), n)


def _replay_randint(monkeypatch, ops, negate):
  """torch.randint returns RandAugment's draws: per op its index, then (signed) its sign."""
  draws = []
  for index, neg in zip(ops, negate):
    draws.append(int(index))
    if ra.SIGNED[index]:
      draws.append(int(neg))
  it = iter(draws)
  monkeypatch.setattr(torch, 'randint', lambda *a, **k: torch.tensor([next(it)]))
  return it


@pytest.mark.parametrize('num_ops,magnitude,bins', [(2, 9, 31), (3, 25, 31), (1, 4, 5)])
def test_randaugment_equals_torchvision_given_the_same_draws(monkeypatch, num_ops, magnitude,
                                                              bins):
  """Through pp (a lone random op gets the example seed) in a tf.data map: torchvision's
  RandAugment, its op and sign draws replayed from ``choices`` of the same seed."""
  cfg = data.DataConfig.parse(_cfg())
  pipe = pp.parse(f'randaugment({num_ops}, {magnitude}, {bins})|center_crop', cfg)
  augment = lambda image, seed: pipe.ops[0][0].fn(image, **pipe.ops[0][1], seed=seed)
  n, seen = 40, set()
  images = [_images()[k % 4] for k in range(n)]
  seeds = _seeds(n)
  for k, ours in enumerate(_map_pairs(augment, images, seeds)):
    ops, negate = (v.numpy() for v in ra.choices(seeds[k], num_ops))
    seen.update(ops)
    it = _replay_randint(monkeypatch, ops, negate)
    chw = torch.from_numpy(images[k]).permute(2, 0, 1).contiguous()
    ref = T.RandAugment(num_ops, magnitude, bins)(chw).permute(1, 2, 0).numpy()
    assert next(it, None) is None  # torchvision took every draw
    diff, frac = _diff(ours, ref)
    assert frac <= 0.01, (k, [ra.NAMES[i] for i in ops], negate, diff, frac)
  assert len(seen) >= 12


def test_randaugment_is_a_pure_function_of_the_seed():
  image = tf.constant(_images()[0])
  seeds = _seeds(12)
  outs = [ra.randaugment(image, s).numpy() for s in seeds]
  for s, out in zip(seeds, outs):
    np.testing.assert_array_equal(ra.randaugment(image, s).numpy(), out)
  distinct = {out.tobytes() for out in outs}
  assert len(distinct) >= 10  # two seeds agree only when both draws are (near) no-ops
  # The op applied is the one `choices` drew, at the signed bin of the table.
  for s, out in zip(seeds, outs):
    ops, negate = ra.choices(s, 2)
    table = ra.magnitudes(tf.shape(image), 9, 31).numpy()
    want = image
    for index, neg in zip(ops.numpy(), negate.numpy()):
      value = -table[index] if ra.SIGNED[index] and neg else table[index]
      want = ra.OPS[ra.NAMES[index]](want, tf.constant(value, tf.float64))
    np.testing.assert_array_equal(out, want.numpy())


def test_randaugment_draws_ops_uniformly_and_signs_fairly():
  n, num_ops = 6000, 2
  ds = tf.data.Dataset.from_tensor_slices(_seeds(n, base=3)).map(
      lambda s: ra.choices(s, num_ops)).batch(n)
  ops, negate = next(iter(ds.as_numpy_iterator()))  # [n, 2] each
  draws = ops.size
  freq = np.bincount(ops.ravel(), minlength=len(ra.NAMES)) / draws
  sigma = math.sqrt((1 / 14) * (13 / 14) / draws)
  assert np.abs(freq - 1 / 14).max() < 4.5 * sigma, freq
  assert abs(negate.mean() - 0.5) < 4.5 * math.sqrt(0.25 / draws)
  # With replacement, independently: the two ops of an example agree 1 time in 14.
  assert abs((ops[:, 0] == ops[:, 1]).mean() - 1 / 14) < 4.5 * math.sqrt(1 / 14 / n)
  for k in range(num_ops):  # each position uniform, signs independent of the op
    assert np.abs(np.bincount(ops[:, k], minlength=14) / n - 1 / 14).max() < 0.02
  assert abs(negate[ops == 1].mean() - 0.5) < 0.06


# ---------------------------------------------------------------- random erasing


class _Uniform:
  """``torch.empty(1)`` whose ``uniform_(a, b)`` is ``a + (b - a) * u`` in float32."""

  def __init__(self, us):
    self.us = us

  def uniform_(self, a, b):
    f32 = lambda v: torch.as_tensor(v, dtype=torch.float32)
    return f32(a) + (f32(b) - f32(a)) * f32(next(self.us))


def _torchvision_box(monkeypatch, shape, draws, scale, ratio):
  """``RandomErasing.get_params`` fed our uniforms: area and log-ratio by turns for each
  try (``torch.empty(1).uniform_``), then top and left (``torch.randint(lo, hi)`` as
  ``lo + floor(u * (hi - lo))``)."""
  u_area, u_ratio, u_pos = (d.numpy() for d in draws)
  us = iter(np.stack([u_area, u_ratio], 1).ravel())
  pos = iter(u_pos)
  monkeypatch.setattr(torch, 'empty', lambda *a, **k: _Uniform(us))
  monkeypatch.setattr(torch, 'randint', lambda lo, hi, size: torch.tensor(
      [lo + int(np.floor(np.float32(next(pos)) * np.float32(hi - lo)))]))
  top, left, h, w, _ = T.RandomErasing.get_params(torch.zeros((3,) + shape), scale, ratio,
                                                  value=[0.0])
  monkeypatch.undo()
  return top, left, h, w


@pytest.mark.parametrize('shape,scale,ratio', [
    (HW, tr.ERASE_SCALE, tr.ERASE_RATIO), ((224, 224), tr.ERASE_SCALE, tr.ERASE_RATIO),
    ((20, 60), (0.6, 0.95), (0.2, 5.0)),  # often no try fits: (0, 0, H, W), not erased
    ((53, 37), (0.1, 0.1), (1.0, 1.0))])
def test_random_erasing_box_is_torchvision_get_params_from_the_same_uniforms(
    monkeypatch, shape, scale, ratio):
  # Exact but for an area at a rounding tie: TF's float32 log/exp may differ in the last bit
  # from torch's, which moves h or w only there (~1e-6 of draws).
  found = []
  for seed in _seeds(60, base=11):
    draws = tr.random_erasing_draws(seed)
    *ours, ok = (int(v) for v in tr.random_erasing_box(tf.constant(shape), *draws, scale, ratio))
    assert tuple(ours) == _torchvision_box(monkeypatch, shape, draws, scale, ratio)
    top, left, h, w = ours
    assert ok == ((h, w) != shape) and 0 <= top <= shape[0] - h and 0 <= left <= shape[1] - w
    found.append(ok)
  assert any(found) and (not all(found)) == (shape == (20, 60))


def _erasing_seed(p, value='mean', start=0):
  """A seed whose draw erases (found by trying), its image and output."""
  image = tf.constant(_images()[0])
  for s in range(start, start + 100):
    seed = tf.constant([s, 5], tf.int64)
    out = tr.random_erasing(image, seed, p, value=value).numpy()
    if (out != image.numpy()).any():
      return seed, image.numpy(), out
  raise AssertionError('no seed erased')


def _box_of(seed, shape):
  s_box = tf.random.experimental.stateless_split(seed, 3)[1]
  *box, found = tr.random_erasing_box(tf.constant(shape), *tr.random_erasing_draws(s_box))
  assert bool(found)
  return [int(v) for v in box]


def test_random_erasing_mean_is_torchvision_value_0_after_normalisation(monkeypatch):
  seed, image, out = _erasing_seed(0.25)
  top, left, h, w = _box_of(seed, image.shape[:2])
  s_box = tf.random.experimental.stateless_split(seed, 3)[1]
  assert (top, left, h, w) == _torchvision_box(monkeypatch, image.shape[:2],
                                               tr.random_erasing_draws(s_box),
                                               tr.ERASE_SCALE, tr.ERASE_RATIO)
  inside = np.zeros(image.shape[:2], bool)
  inside[top:top + h, left:left + w] = True
  np.testing.assert_array_equal(out[~inside], image[~inside])  # the rest untouched
  normalised = tr.normalize(out).numpy()
  bound = 0.5 / 255 / np.float32(tr.IMAGENET_STD)  # half a grey level, normalised
  assert (np.abs(normalised[inside]) <= bound).all() and np.abs(normalised[inside]).max() > 0
  assert tuple(out[top, left]) == tr.MEAN_UINT8 == (124, 116, 104)
  # torchvision's RandomErasing(value=0) on the normalised image, the same box.
  ref = T.functional.erase(torch.from_numpy(tr.normalize(image).numpy()).permute(2, 0, 1),
                           top, left, h, w, torch.tensor(0.0)).permute(1, 2, 0).numpy()
  assert np.abs(normalised - ref).max() <= bound.max()


def test_random_erasing_random_is_clipped_normal_noise_in_normalised_space():
  seed, image, out = _erasing_seed(1.0, 'random')
  top, left, h, w = _box_of(seed, image.shape[:2])
  inside = np.zeros(image.shape[:2], bool)
  inside[top:top + h, left:left + w] = True
  np.testing.assert_array_equal(out[~inside], image[~inside])
  noise = tr.normalize(out).numpy()[inside]  # [h * w, 3]
  lo = -np.float32(tr.IMAGENET_MEAN) / np.float32(tr.IMAGENET_STD)
  hi = (1 - np.float32(tr.IMAGENET_MEAN)) / np.float32(tr.IMAGENET_STD)
  assert (noise >= lo - 1e-5).all() and (noise <= hi + 1e-5).all()
  assert h * w >= 30 and np.abs(noise.mean(0)).max() < 4 / math.sqrt(h * w)
  assert np.abs(noise.std(0) - 0.95).max() < 0.25  # N(0, 1) a little shrunk by the clipping
  np.testing.assert_array_equal(tr.random_erasing(tf.constant(image), seed, 1.0,
                                                  value='random').numpy(), out)


@pytest.mark.parametrize('p', [0.0, 0.25, 0.7, 1.0])
def test_random_erasing_happens_with_probability_p(p):
  n = 3000
  image = tf.constant(_images()[0])
  ds = tf.data.Dataset.from_tensor_slices(_seeds(n, base=5)).map(pipeline.graph_fn(
      lambda s: tf.reduce_any(tr.random_erasing(image, s, p) != image))).batch(n)
  erased = next(iter(ds.as_numpy_iterator()))
  assert abs(erased.mean() - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-3


# ---------------------------------------------------------------- in a config


def _cfg(**kw):
  cfg = config_lib.base_config().data
  cfg.update(dict(dict(source='folder', image_size=32), **kw))
  return cfg


SPEC = 'random_resized_crop|flip_lr|randaugment(2, 9)|random_erasing(0.25)'


def test_a_config_string_with_both_ops():
  cfg = data.DataConfig.parse(_cfg(pp_train=SPEC))
  pipe = pp.from_config(cfg, 'pp_train')
  assert [op.fn.__name__ for op, _ in pipe.ops] == ['random_resized_crop', 'flip_lr',
                                                     'randaugment', 'random_erasing']
  assert pipe.ops[2][1] == {'num_ops': 2, 'magnitude': 9, 'num_magnitude_bins': 31}
  assert pipe.ops[3][1] == {'p': 0.25, 'scale': (0.02, 0.33), 'ratio': (0.3, 3.3),
                            'value': 'mean'}
  assert pipe.num_random == 4
  traced = tf.function(pipe.__call__, autograph=False).get_concrete_function(
      tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64))
  assert tuple(traced.structured_outputs.shape) == pipe.output_shape() == (32, 32, 3)
  # Op k gets stateless_split(seed, 4)[k].
  image = tf.constant(np.random.default_rng(2).integers(0, 256, (40, 52, 3), np.uint8))
  seed = tf.constant([4, 2], tf.int64)
  s = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  want = tr.random_resized_crop(image, 32, s[0], interpolation=cfg.interpolation)
  want = tr.random_erasing(ra.randaugment(tr.random_flip(want, s[1]), s[2]), s[3], 0.25)
  np.testing.assert_array_equal(pipe(image, seed).numpy(), want.numpy())
  again = pp.parse(SPEC.replace('(0.25)', "(0.5, value='random')"), cfg)
  assert again.ops[3][1]['value'] == 'random' and again.ops[3][1]['p'] == 0.5


@pytest.mark.parametrize('spec,match', [
    ('randaugment(magnitude=31)', r'magnitude=31, num_magnitude_bins=31; expected magnitude <'),
    ('randaugment(2, 5, 5)', r'magnitude=5, num_magnitude_bins=5; expected magnitude <'),
    ('randaugment(-1)', r'num_ops=-1; expected an integer >= 0'),
    ('randaugment(2, 0, 1)', r'num_magnitude_bins=1; expected an integer >= 2'),
    ('randaugment(2, 9.5)', r'magnitude=9.5 is not of type int'),
    ('random_erasing(1.5)', r'p=1.5; expected a number in \[0, 1\]'),
    ('random_erasing(scale=(0.4, 0.1))', r'scale=\(0.4, 0.1\); expected a pair'),
    ('random_erasing(ratio=(0, 3))', r'ratio=\(0, 3\); expected a pair .* 0 < min'),
    ("random_erasing(value='pixel')", r"value='pixel' is not one of \('mean', 'random'\)"),
])
def test_bad_arguments_are_one_line_errors(spec, match):
  cfg = data.DataConfig.parse(_cfg())
  full = f'random_resized_crop|{spec}'
  with pytest.raises(ValueError, match=match) as e:
    pp.parse(full, cfg)
  assert '\n' not in str(e.value) and f'config.data.pp_train={full!r}' in str(e.value)


def test_both_ops_run_through_build(tmp_path):
  fake.make_fake_flowers(str(tmp_path), num_classes=4, per_class=6, image_size=(40, 52), seed=7)
  build = lambda: data.build(_cfg(dir=str(tmp_path), pp_train=SPEC), seed=5, process_index=0,
                             process_count=1)
  batches = list(build().train_batches(4, 0))
  again = list(build().train_batches(4, 0))
  assert batches[0]['image'].shape == (4, 32, 32, 3)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])
