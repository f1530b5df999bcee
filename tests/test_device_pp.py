"""device_pp's ops against the host path's (pp / transforms in TF) on the same image and the
same drawn parameters; the registry of device ops; the cache's layout, bytes and placement."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax import parallel
from flowers_jax.data import device_cache
from flowers_jax.data import device_pp
from flowers_jax.data import fake
from flowers_jax.data import pipeline
from flowers_jax.data import pp

tf = pipeline.import_tf()
N = 48  # random windows / coins per case
# Odd sizes, both orientations: a landscape, a portrait (stored transposed vs not).
IMAGES = [fake.render(1, 4, 57, 83, np.random.default_rng(0)),
          fake.render(2, 4, 91, 45, np.random.default_rng(1))]
CACHE = device_cache.pack(IMAGES, [im.shape[:2] for im in IMAGES], 128, 'bilinear')  # = originals


def _pipe(spec: str, size: int, method: str, eval_resize: int = 0) -> pp.Pipeline:
  cfg = config_lib.base_config().data
  cfg.update(dict(image_size=size, interpolation=method, eval_resize=eval_resize or size + 7))
  return pp.parse(spec, data.DataConfig.parse(cfg))


def _host(pipe: pp.Pipeline, image: np.ndarray, n: int):
  """The host path's outputs uint8 [n, S, S, 3] and its drawn parameters, seeds 0..n-1."""
  def one(i):
    seed = pipeline.example_seed(tf.constant([3, 1], tf.int64), i)
    return pipe(tf.constant(image), seed), pipe.draw(tf.shape(image), seed)
  ds = tf.data.Dataset.range(n).map(pipeline.graph_fn(one)).batch(n)
  return next(iter(ds.as_numpy_iterator()))


def _device(pipe: pp.Pipeline, k: int, params: dict, n: int) -> np.ndarray:
  spec = device_pp.Spec.make(pipe, CACHE)
  return np.asarray(device_pp.augment(CACHE.arrays(), dict(params, index=np.full(n, k, np.int32)),
                                      spec))


# (spec, S): downscale and upscale, crops before and after the resize, zero padding, flips
# first and last, odd sizes.
CASES = [
    ('random_resized_crop|flip_lr', 24),  # mostly downscale
    ('random_resized_crop', 101),  # upscale
    ('resize', 37),
    ('resize_small|center_crop|flip_lr', 31),  # the 'flip' preset
    ('flip_lr|resize_small(70)|center_crop', 67),
    ('center_crop(33)', 33),  # no resize: the cache's own pixels ('center_crop' is a preset)
    ('center_crop(100)', 100),  # larger than the image: zero padding
    ('resize_small(150)|center_crop', 149),
]


@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('spec,size', CASES, ids=[c[0] for c in CASES])
def test_device_ops_match_the_host_path(spec, size, method):
  """At most 2 grey levels apart, 0.5 on average (measured: max 1, mean < 0.01)."""
  pipe = _pipe(spec, size, method)
  for k, image in enumerate(IMAGES):
    host, params = _host(pipe, image, N)
    got = _device(pipe, k, params, N)
    diff = np.abs(got.astype(int) - host.astype(int))
    print(f'{spec} S={size} {method} image {image.shape[:2]}: max {diff.max()},'
          f' mean {diff.mean():.4f}')
    assert diff.max() <= 2 and diff.mean() <= 0.5, (spec, method, k)


@pytest.mark.parametrize('method', ['area', 'nearest'])
def test_area_and_nearest(method):
  """TF's resize_area / resize_nearest_neighbor (not antialiased): measured max 1 / 0."""
  pipe = _pipe('random_resized_crop|flip_lr', 40, method)
  for k, image in enumerate(IMAGES):
    host, params = _host(pipe, image, N)
    diff = np.abs(_device(pipe, k, params, N).astype(int) - host.astype(int))
    print(f'{method} image {image.shape[:2]}: max {diff.max()}, mean {diff.mean():.4f}')
    assert diff.max() <= 2 and diff.mean() <= 0.5


@pytest.mark.parametrize('spec,size', [('resize_small(50)|random_resized_crop|flip_lr', 40),
                                       ('center_crop(100)|resize(40)', 40)])
def test_composed_resizes_are_an_approximation(spec, size):
  """Two resizes (the host resamples twice, the device once, from the original), or zero
  padding blended in by a later resize on the host only: measured mean 1.5-3.3 levels, max ~110
  at sharp edges of this noisy synthetic image; a wrong geometry would be tens of levels off on
  average. The random op after resize_small draws for the resized shape (Pipeline.draw)."""
  pipe = _pipe(spec, size, 'bilinear')
  for k, image in enumerate(IMAGES):
    host, params = _host(pipe, image, N)
    diff = np.abs(_device(pipe, k, params, N).astype(int) - host.astype(int))
    print(f'{spec} image {image.shape[:2]}: max {diff.max()}, mean {diff.mean():.2f}')
    assert diff.mean() <= 5


def test_draw_gives_the_parameters_the_host_applies():
  """pp.Pipeline.draw's window and coin, applied with transforms, rebuild the host output bit
  for bit (the same seed split, the same functions of the seed)."""
  from flowers_jax.data import transforms as tr
  pipe = _pipe('rrc_flip', 32, 'bilinear')
  image = IMAGES[0]
  host, params = _host(pipe, image, N)
  for i in range(N):
    top, left, h, w = params['0.window'][i]
    assert 0 <= top and top + h <= image.shape[0] and 0 <= left and left + w <= image.shape[1]
    x = tr.resize(image[top:top + h, left:left + w], 32, 32, 'bilinear').numpy()
    np.testing.assert_array_equal(x[:, ::-1] if params['1.flip'][i] else x, host[i])
  assert 0 < params['1.flip'].mean() < 1 and len({tuple(w) for w in params['0.window']}) == N


def test_unsupported_names_the_host_only_ops():
  assert device_pp.unsupported(_pipe('rrc_flip', 32, 'bilinear')) is None
  assert device_pp.unsupported(_pipe('resize_small|center_crop', 32, 'bicubic')) is None
  line = device_pp.unsupported(
      _pipe('random_resized_crop|randaugment|random_erasing|flip_lr', 32, 'bilinear'))
  assert "['randaugment', 'random_erasing']" in line and '\n' not in line
  line = device_pp.unsupported(_pipe('resize_small|random_crop(padding=4)', 32, 'bilinear'))
  assert "['random_crop']" in line
  with pytest.raises(ValueError, match='random_crop'):
    device_pp.Spec.make(_pipe('resize_small|random_crop', 32, 'bilinear'), CACHE)
  # Every random device op has its host-side draw; every device op is a pp op.
  assert set(device_pp.OPS) <= set(pp.OPS)
  assert all(pp.OPS[name].draw is not None for name in device_pp.OPS if pp.OPS[name].random)


def test_pack_layout_bytes_and_padding():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(30, 50), (50, 30), (20, 25)]]
  cache = device_cache.pack(images, [(60, 100), (50, 30), (20, 25)], 30, 'bicubic')
  # Longer side first, concatenated; the shorter sides padded to 30; a tail so that a slice of
  # the longest side (50) from the last start (100) stays inside.
  np.testing.assert_array_equal(cache.start, [0, 50, 100])
  np.testing.assert_array_equal(cache.transposed, [1, 0, 1])
  assert cache.pixels.shape == (150, 30, 3) and cache.length == 50
  assert cache.image_bytes == (1500 + 1500 + 500) * 3
  index_bytes = 3 * 4 * (1 + 2 + 2 + 1)
  assert cache.nbytes == 150 * 30 * 3 + index_bytes
  for i, image in enumerate(images):
    h, w = cache.hw[i]
    block = cache.pixels[cache.start[i]:cache.start[i] + max(h, w), :min(h, w)]
    np.testing.assert_array_equal(block.transpose(1, 0, 2) if cache.transposed[i] else block,
                                  image)
  assert not cache.pixels[100 + 25:].any() and not cache.pixels[100:, 20:].any()  # zero padding
  with pytest.raises(ValueError, match='cache size'):
    device_cache.pack(images, [(30, 50)] * 3, 25, 'bilinear')


def test_fits_and_device_memory():
  limit, source = device_cache.device_memory()
  assert limit > 0 and source  # CPU: host MemAvailable / local devices
  assert device_cache.fits(0) and not device_cache.fits(1 << 60)
  assert device_cache.fits(limit // 2, share=0.5) and not device_cache.fits(limit, share=0.5)


@pytest.mark.parametrize('mode', ['sharded', 'pmap'])
def test_augmenter_output_is_laid_out_as_the_strategy_batch(mode):
  """4 fake CPU devices (conftest): the images equal augment's on one device, with the
  batch's own sharding (sharded: P('data'); pmap: [4, b / 4, S, S, 3] over the devices)."""
  strategy = parallel.make(mode)
  pipe = _pipe('rrc_flip', 24, 'bilinear')
  host, params = _host(pipe, IMAGES[1], 8)
  params = dict(params, index=np.array([0, 1] * 4, np.int32))
  want = np.asarray(device_pp.augment(CACHE.arrays(), params, device_pp.Spec.make(pipe, CACHE)))
  batch = strategy.put_batch({'label': np.arange(8, dtype=np.int32),
                              pp.PARAMS_KEY: {'image': params, 'positive': params}})
  out = device_pp.Augmenter(CACHE, pipe, strategy)(batch)
  assert set(out) == {'label', 'image', 'positive'}
  for key in ('image', 'positive'):
    assert out[key].dtype == np.uint8 and out[key].sharding == out['label'].sharding
    got = np.asarray(out[key])
    assert got.shape == ((4, 2, 24, 24, 3) if mode == 'pmap' else (8, 24, 24, 3))
    np.testing.assert_array_equal(got.reshape(want.shape), want)
  assert np.abs(want[1::2].astype(int) - host[1::2]).max() <= 1  # image 1's rows: its host pixels


def test_device_pp_imports_without_tensorflow():
  code = ('import sys, flowers_jax.data.device_pp, flowers_jax.data.device_cache; '
          'assert "tensorflow" not in sys.modules, "device_pp imported tensorflow"')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_cpu_throughput_is_reported():
  """Not a check: device_pp.augment's img/s at S=224 from a 448-px cache on this CPU."""
  import time
  image = fake.render(0, 4, 500, 667, np.random.default_rng(0))
  big = device_cache.pack([image[:448, :597]], [(500, 667)], 448, 'bilinear')
  pipe = _pipe('rrc_flip', 224, 'bilinear')
  _, params = _host(pipe, image, 32)
  spec = device_pp.Spec.make(pipe, big)
  arrays = jax.device_put(big.arrays())
  params = dict(params, index=np.zeros(32, np.int32))
  device_pp.augment(arrays, params, spec).block_until_ready()
  start = time.perf_counter()
  device_pp.augment(arrays, params, spec).block_until_ready()
  print(f'device_pp.augment on {jax.devices()[0].platform}: '
        f'{32 / (time.perf_counter() - start):.0f} img/s at 224 px')
