"""Dataset.device_train_stream + device_pp end to end on the synthetic set: the same rows and
parameters as train_stream, images within the resize kernel's arithmetic of the host's."""

import itertools

import numpy as np
import pytest

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax import parallel
from flowers_jax.data import device_pp
from flowers_jax.data import fake
from flowers_jax.data import pp
from flowers_jax.data import transforms as tr

S, G = 32, 8


@pytest.fixture(scope='module')
def fake_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('fake')
  fake.make_fake_flowers(str(root), num_classes=4, per_class=8, image_size=(41, 53), seed=3)
  return root  # 16 train images of 41 x 53


def _build(root, process_index=0, process_count=1, **kw):
  cfg = config_lib.base_config().data
  cfg.update(dict(dict(source='folder', dir=str(root), image_size=S), **kw))
  return data.build(cfg, seed=4, process_index=process_index, process_count=process_count)


def _take(it, n):
  return list(itertools.islice(it, n))


def _images(ds, batch, key='image'):
  cache = ds.device_cache('train')
  spec = device_pp.Spec.make(pp.from_config(ds.config, 'pp_train'), cache)
  return np.asarray(device_pp.augment(cache.arrays(), batch[pp.PARAMS_KEY][key], spec))


@pytest.mark.parametrize('sampler', ['random', 'triplet'])
def test_device_images_match_the_host_stream(fake_dir, sampler):
  """The cache holds the originals (device_cache_size 2 S = 64 >= 41): only the resize kernel's
  arithmetic differs. 5 steps = 40 rows, across the pass boundary at row 16."""
  ds = _build(fake_dir)
  host = _take(ds.train_stream(G, sampler=sampler), 5)
  device = _take(ds.device_train_stream(G, sampler=sampler), 5)
  keys = ['image'] + (['positive', 'negative'] if sampler == 'triplet' else [])
  for h, d in zip(host, device):
    assert set(d) == set(h) - set(keys) | {pp.PARAMS_KEY} and set(d[pp.PARAMS_KEY]) == set(keys)
    for k in set(h) - set(keys):
      np.testing.assert_array_equal(d[k], h[k], err_msg=k)
    for key in keys:
      diff = np.abs(_images(ds, d, key).astype(int) - h[key].astype(int))
      assert diff.max() <= 2 and diff.mean() <= 0.5, (key, diff.max(), diff.mean())


def test_stream_parameters_are_the_host_paths(fake_dir):
  """The original cropped at the stream's window, resized and flipped by its coin with the host's
  transforms is the host stream's image bit for bit."""
  ds = _build(fake_dir)
  cache = ds.device_cache('train')
  host, device = _take(ds.train_stream(G), 3), _take(ds.device_train_stream(G), 3)
  for h, d in zip(host, device):
    p = d[pp.PARAMS_KEY]['image']
    for row, i in enumerate(p['index']):
      assert not cache.transposed[i] or cache.hw[i][0] < cache.hw[i][1]
      long_, short = cache.hw[i].max(), cache.hw[i].min()
      block = cache.pixels[cache.start[i]:cache.start[i] + long_, :short]
      original = block.transpose(1, 0, 2) if cache.transposed[i] else block
      top, left, hh, ww = p['0.window'][row]
      x = tr.resize(original[top:top + hh, left:left + ww], S, S, 'bilinear').numpy()
      np.testing.assert_array_equal(x[:, ::-1] if p['1.flip'][row] else x, h['image'][row])


def test_start_step_resumes_exactly(fake_dir):
  ds = _build(fake_dir)
  whole = _take(ds.device_train_stream(G, sampler='triplet'), 6)
  resumed = _take(ds.device_train_stream(G, start_step=3, sampler='triplet'), 3)
  flat = lambda b: {f'{k}/{n}': v for k, p in b[pp.PARAMS_KEY].items() for n, v in p.items()}
  for a, b in zip(whole[3:], resumed):
    assert flat(a).keys() == flat(b).keys()
    for k in flat(a):
      np.testing.assert_array_equal(flat(a)[k], flat(b)[k], err_msg=k)
    np.testing.assert_array_equal(a['label'], b['label'])


def test_two_hosts_split_the_rows(fake_dir):
  whole = _take(_build(fake_dir).device_train_stream(G), 2)
  parts = [_take(_build(fake_dir, p, 2).device_train_stream(G), 2) for p in range(2)]
  for step, batch in enumerate(whole):
    for name, value in batch[pp.PARAMS_KEY]['image'].items():
      joined = np.concatenate([parts[p][step][pp.PARAMS_KEY]['image'][name] for p in range(2)])
      np.testing.assert_array_equal(joined, value, err_msg=name)


def test_augmenter_on_stream_batches(fake_dir):
  """What the loop does: put_batch, then the Augmenter; 4 fake devices, 'sharded'."""
  ds = _build(fake_dir)
  strategy = parallel.make('sharded')
  augmenter = device_pp.Augmenter(ds.device_cache('train'),
                                  pp.from_config(ds.config, 'pp_train'), strategy)
  host = next(ds.device_train_stream(G, sampler='triplet'))
  out = augmenter(strategy.put_batch(host))
  for key in ('image', 'positive', 'negative'):
    np.testing.assert_array_equal(np.asarray(out[key]), _images(ds, host, key))
    assert out[key].sharding == strategy.data_sharding


def test_unsupported_ops_are_refused_in_one_line(fake_dir):
  ds = _build(fake_dir, pp_train='resize_small|random_crop(padding=4)|flip_lr')
  with pytest.raises(ValueError, match=r"\['random_crop'\]") as e:
    ds.device_train_stream(G)
  assert '\n' not in str(e.value)


def test_cache_bytes_and_a_shrunk_cache(fake_dir):
  """16 images of 41 x 53: kept as they are at 64 (never enlarged), 32 x 41 at 32; the shrunk
  cache is an approximation (two resamples), measured against the host path."""
  ds = _build(fake_dir)
  cache = ds.device_cache('train')
  assert ds.device_cache('train') is cache  # built once
  np.testing.assert_array_equal(cache.hw, [[41, 53]] * 16)
  np.testing.assert_array_equal(cache.orig_hw, [[41, 53]] * 16)
  assert cache.pixels.shape == (16 * 53, 41, 3) and cache.size == 2 * S
  assert cache.image_bytes == 16 * 41 * 53 * 3 == cache.pixels.nbytes  # no padding
  assert cache.nbytes == cache.pixels.nbytes + 16 * 4 * 6
  small = _build(fake_dir, device_cache_size=S)
  shrunk = small.device_cache('train')
  np.testing.assert_array_equal(shrunk.hw, [[32, 41]] * 16)  # torchvision: floor(32 * 53 / 41)
  np.testing.assert_array_equal(shrunk.orig_hw, [[41, 53]] * 16)
  host, device = _take(small.train_stream(G), 2), _take(small.device_train_stream(G), 2)
  diff = np.concatenate([np.abs(_images(small, d).astype(int) - h['image']).ravel()
                         for h, d in zip(host, device)])
  print(f'cache 32 px of 41: max {diff.max()}, mean {diff.mean():.2f} grey levels')
  assert diff.mean() <= 8
