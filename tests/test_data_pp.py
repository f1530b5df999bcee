"""data.pp: op strings, presets equal to the fixed recipes they name, seeds, errors."""

import subprocess
import sys

import numpy as np
import pytest

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax.data import fake
from flowers_jax.data import pipeline
from flowers_jax.data import pp
from flowers_jax.data import transforms as tr

tf = pipeline.import_tf()
SEED, EPOCH, S = 5, 3, 32


def _cfg(**kw):
  cfg = config_lib.base_config().data
  cfg.update(dict(dict(source='folder', image_size=S), **kw))
  return cfg


@pytest.fixture(scope='module')
def fake_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('fake')
  fake.make_fake_flowers(str(root), num_classes=4, per_class=6, image_size=(40, 52), seed=7)
  return root  # 12 train, 8 validation images of 40 x 52


def _build(root, **kw):
  return data.build(_cfg(dir=str(root), **kw), seed=SEED, process_index=0, process_count=1)


# The recipes the presets stand for, composed directly from transforms: image uint8
# [H, W, 3], seed int64 [2] (rrc_flip splits it in two: crop, flip).


def _eval_view(image, cfg):
  h, w = tr.resize_shorter_size(tf.shape(image), cfg.eval_resize)
  image = tr.resize(image, h, w, cfg.interpolation)
  top, left, ch, cw = tr.center_crop_window(tf.shape(image), cfg.image_size)
  return tf.image.crop_to_bounding_box(image, top, left, ch, cw)


def _rrc_flip(image, seed, cfg):
  s_crop, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  top, left, h, w = tr.random_resized_crop_window(tf.shape(image), s_crop)
  image = tr.resize(image[top:top + h, left:left + w], cfg.image_size, cfg.image_size,
                    cfg.interpolation)
  return tr.random_flip(image, s_flip)


REFERENCE = {
    'rrc_flip': _rrc_flip,
    'flip': lambda image, seed, cfg: tr.random_flip(_eval_view(image, cfg), seed),
    'none': lambda image, seed, cfg: _eval_view(image, cfg),
}


def _expected_train(ds, plan, parts=('index',)):
  """The reference images of a global plan: uint8 [steps, G, S, S, 3] per part."""
  store = pipeline.ImageStore(ds.splits['train'], 'bytes')
  base = tf.constant([SEED, EPOCH], tf.int64)
  steps, g = plan['index'].shape
  out = {}
  for part, key in enumerate(parts):
    images = []
    for position, i in enumerate(plan[key].ravel()):
      seed = pipeline.example_seed(base, tf.constant(position, tf.int64), part)
      images.append(REFERENCE[ds.config.pp_train](store.full(i), seed, ds.config).numpy())
    out[key] = np.stack(images).reshape(steps, g, S, S, 3)
  return out


@pytest.mark.parametrize('preset', ['rrc_flip', 'flip', 'none'])
def test_train_presets_equal_the_fixed_recipes(fake_dir, preset):
  ds = _build(fake_dir, pp_train=preset)
  batches = list(ds.train_batches(4, EPOCH))
  want = _expected_train(ds, ds.train_plan(4, EPOCH))['index']
  np.testing.assert_array_equal(np.stack([b['image'] for b in batches]), want)
  if preset != 'none':  # random: not the same as the eval view
    view = _expected_train(_build(fake_dir, pp_train='none'), ds.train_plan(4, EPOCH))['index']
    assert np.abs(want.astype(int) - view).max() > 0


def test_triplet_parts_get_their_own_seeds(fake_dir):
  ds = _build(fake_dir, pp_train='rrc_flip')
  (batch,) = list(ds.train_batches(12, EPOCH, sampler='triplet'))
  plan = ds.train_plan(12, EPOCH, sampler='triplet')
  want = _expected_train(ds, plan, parts=('index', 'positive', 'negative'))
  for key, plan_key in [('image', 'index'), ('positive', 'positive'), ('negative', 'negative')]:
    np.testing.assert_array_equal(batch[key], want[plan_key][0], err_msg=key)


def test_eval_preset_equals_the_eval_view(fake_dir):
  ds = _build(fake_dir, pp_eval='center_crop')
  assert ds.config.eval_resize == 37  # round(32 * 256 / 224)
  (batch,) = list(ds.eval_batches('validation', 8))
  store = pipeline.ImageStore(ds.splits['validation'], 'bytes')
  want = [_eval_view(store.full(i), ds.config).numpy() for i in range(8)]
  np.testing.assert_array_equal(batch['image'], np.stack(want))


def test_custom_op_strings_run_through_build(fake_dir):
  spec = 'resize_small(40) | random_crop(32, padding=4) | flip_lr'
  ds = _build(fake_dir, pp_train=spec, pp_eval='resize(method="bicubic")')
  batches = list(ds.train_batches(4, EPOCH))
  again = list(_build(fake_dir, pp_train=spec, cache=False).train_batches(4, EPOCH))
  assert len(batches) == 3 and batches[0]['image'].shape == (4, S, S, 3)
  np.testing.assert_array_equal(batches[2]['image'], again[2]['image'])
  # Zero padding shows up as black pixels somewhere in the epoch (batches are uint8).
  images = np.concatenate([b['image'] for b in batches])
  assert images.dtype == np.uint8 and (images.max(-1) == 0).any()
  (batch,) = list(ds.eval_batches('validation', 8))
  store = pipeline.ImageStore(ds.splits['validation'], 'bytes')
  want = [tr.resize(store.full(i), S, S, 'bicubic').numpy() for i in range(8)]
  np.testing.assert_array_equal(batch['image'], np.stack(want))


def test_random_op_seeds():
  """The k-th of n random ops gets stateless_split(seed, n)[k]; a lone one the seed."""
  cfg = data.DataConfig.parse(_cfg(image_size=8))
  image = tf.constant(np.arange(10 * 12 * 3).reshape(10, 12, 3) % 251, tf.uint8)
  seed = tf.constant([4, 2], tf.int64)
  lone = pp.parse('random_crop(8, padding=2)', cfg)(image, seed)
  np.testing.assert_array_equal(lone.numpy(), tr.random_crop(image, 8, seed, 2).numpy())
  s0, s1 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  two = pp.parse('random_crop(8, padding=2)|flip_lr', cfg)(image, seed)
  want = tr.random_flip(tr.random_crop(image, 8, s0, 2), s1)
  np.testing.assert_array_equal(two.numpy(), want.numpy())


def test_random_crop_is_a_uniform_window_of_the_padded_image():
  image = (np.arange(10 * 12 * 3).reshape(10, 12, 3) % 250 + 1).astype(np.uint8)  # no 0
  padded = np.pad(image, [(2, 2), (2, 2), (0, 0)])  # [14, 16, 3]
  offsets = []
  for s in range(150):
    crop = tr.random_crop(tf.constant(image), 8, tf.constant([s, 1], tf.int64), 2).numpy()
    assert crop.shape == (8, 8, 3)
    found = [(top, left) for top in range(7) for left in range(9)
             if np.array_equal(padded[top:top + 8, left:left + 8], crop)]
    assert len(found) == 1
    offsets.append(found[0])
  tops, lefts = zip(*offsets)
  assert set(tops) == set(range(7)) and set(lefts) == set(range(9))
  top, left = offsets[3]
  again = tr.random_crop(tf.constant(image), 8, tf.constant([3, 1], tf.int64), 2).numpy()
  np.testing.assert_array_equal(again, padded[top:top + 8, left:left + 8])


def test_parse_args_defaults_and_presets():
  cfg = data.DataConfig.parse(_cfg(interpolation='bicubic'))
  (resize, center) = pp.parse('resize_small(256, method="area")|center_crop(32)', cfg).ops
  assert resize[1] == {'size': 256, 'method': 'area'} and center[1] == {'size': 32}
  (resize, center) = pp.parse('resize_small|center_crop', cfg).ops
  assert resize[1] == {'size': 37, 'method': 'bicubic'} and center[1] == {'size': 32}
  assert [op.fn.__name__ for op, _ in pp.parse('center_crop', cfg, 'pp_eval').ops] == [
      'resize_small', 'center_crop']
  rrc = pp.parse('rrc_flip', cfg)
  assert [op.fn.__name__ for op, _ in rrc.ops] == ['random_resized_crop', 'flip_lr']
  assert rrc.ops[0][1] == {'size': 32, 'method': 'bicubic', 'scale': (0.08, 1.0),
                           'ratio': (3 / 4, 4 / 3)} and rrc.num_random == 2


@pytest.mark.parametrize('spec,match', [
    ('blur', r"unknown op 'blur'; valid ops: \[.*'random_crop'.*\]; presets.*'rrc_flip'"),
    ('rrc_flip|flip_lr', r"unknown op 'rrc_flip'"),
    ('center_crop(32', 'cannot parse'),
    ('center_crop(size)', 'not Python literals'),
    ('center_crop("32")', "size='32' is not of type int"),
    ('center_crop(32, 2)', 'too many positional'),
    ('resize(32, method="lanczos")', "method='lanczos' is not one of"),
    ('random_crop(32, pad=4)', "unexpected keyword argument 'pad'"),
    ('flip_lr(seed=3)', 'the seed is not an argument'),
    ('resize_small(40)|center_crop(30)', r'shape \[30, 30, 3\], not image_size \[32, 32, 3\]'),
    ('resize_small', r'shape \[None, None, 3\]'),
    # Values, checked when parsed (they failed at step 0, or never).
    ('random_resized_crop(scale=(0.5,))', r'scale=\(0.5,\); expected a pair \(min, max\)'),
    ('random_resized_crop(ratio=(0, 1))', r'ratio=\(0, 1\); expected a pair .* 0 < min'),
    ("random_resized_crop(scale=('a', 'b'))", 'expected a pair'),
    ('random_resized_crop(scale=(1.0, 0.08))', r'min <= max <= 1'),
    ('random_crop(32, padding=-3)', r'padding=-3; expected an integer >= 0'),
    ('resize_small(-4)|center_crop', r'size=-4; expected an integer >= 1'),
    ('center_crop(0)', r'size=0; expected an integer >= 1'),
])
def test_parse_errors_are_one_line(spec, match):
  cfg = data.DataConfig.parse(_cfg())
  with pytest.raises(ValueError, match=match) as e:
    pp.parse(spec, cfg)
  assert '\n' not in str(e.value) and f'config.data.pp_train={spec!r}' in str(e.value)


def test_config_errors_before_any_data_is_read(tmp_path):
  missing = str(tmp_path / 'no_such_dir')  # a read would fail with FileNotFoundError
  with pytest.raises(ValueError, match=r"config.data.pp_eval='rrc_flip' has random ops"):
    _build(missing, pp_eval='rrc_flip')
  with pytest.raises(ValueError, match="pp_train='rrc'.*unknown op 'rrc'"):
    _build(missing, pp_train='rrc')
  cfg = dict(_cfg(dir=missing).to_dict(), train_augment='flip')
  with pytest.raises(ValueError, match=r"unknown keys \['train_augment'\]; valid keys: \["
                                       r"'source'.*'pp_train', 'pp_eval'"):
    data.build(cfg, process_index=0, process_count=1)
  del cfg['train_augment'], cfg['cache']
  with pytest.raises(ValueError, match=r"missing keys \['cache'\]"):
    data.build(cfg, process_index=0, process_count=1)


@pytest.mark.parametrize('spec', ['rrc_flip', 'flip', 'center_crop', 'random_crop(32, 4)|flip_lr',
                                  'resize_small(50)|center_crop(32)', 'resize(32)'])
def test_declared_output_sizes_match_the_traced_ops(spec):
  """`parse` checks sizes from each op's declared `out`; tracing the ops gives the same."""
  cfg = data.DataConfig.parse(_cfg())
  pipe = pp.parse(spec, cfg)
  traced = tf.function(pipe.__call__, autograph=False).get_concrete_function(
      tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64))
  assert tuple(traced.structured_outputs.shape) == pipe.output_shape() == (32, 32, 3)


def test_parsing_a_config_does_not_import_tensorflow():
  """Config errors come before the seconds TensorFlow takes to import (and its log lines)."""
  code = ('import sys; from flowers_jax import data; from flowers_jax.config import base_config; '
          'data.DataConfig.parse(base_config().data); '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
