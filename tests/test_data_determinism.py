"""Train order and augmentation are pure functions of (seed, epoch, position)."""

import numpy as np
import pytest

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax.data import fake


@pytest.fixture(scope='module')
def fake_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('fake')
  fake.make_fake_flowers(str(root), num_classes=4, per_class=12, image_size=40, seed=3)
  return root  # 24 train images


def _cfg(**kw):
  """``base_config().data`` with ``kw`` overridden."""
  cfg = config_lib.base_config().data
  cfg.update(kw)
  return cfg


def _build(root, seed=0, process_index=0, process_count=1, **kw):
  cfg = _cfg(source='folder', dir=str(root), image_size=32, **kw)
  return data.build(cfg, seed=seed, process_index=process_index,
                    process_count=process_count)


def _stack(batches, key='image'):
  return np.stack([b[key] for b in batches])


def test_same_seed_same_batches_and_restart(fake_dir):
  ds1, ds2 = _build(fake_dir), _build(fake_dir, cache=False)
  full = list(ds1.train_batches(4, epoch=2))
  assert len(full) == 6
  again = list(ds2.train_batches(4, epoch=2))  # another Dataset, no cache
  np.testing.assert_array_equal(_stack(full), _stack(again))
  np.testing.assert_array_equal(_stack(full, 'label'), _stack(again, 'label'))
  resumed = list(ds1.train_batches(4, epoch=2, start_step=4))
  assert len(resumed) == 2
  np.testing.assert_array_equal(_stack(full[4:]), _stack(resumed))
  # The augmentation is random: two batches of one epoch differ, a flip/crop happened.
  assert np.abs(full[0]['image'] - full[1]['image']).max() > 0.5


@pytest.mark.parametrize('pp_train', ['rrc_flip', 'resize_small|random_crop(padding=4)|flip_lr'])
def test_same_position_same_pixels_for_any_batch_size(fake_dir, pp_train):
  """The epoch's order does not depend on the batch size, nor does an example's seed."""
  ds = _build(fake_dir, pp_train=pp_train)
  by_8 = _stack(ds.train_batches(8, epoch=1)).reshape(24, 32, 32, 3)
  by_4 = _stack(ds.train_batches(4, epoch=1, start_step=2)).reshape(16, 32, 32, 3)
  np.testing.assert_array_equal(by_4, by_8[8:])
  by_12 = _stack(_build(fake_dir, pp_train=pp_train, cache=False).train_batches(12, epoch=1))
  np.testing.assert_array_equal(by_12.reshape(24, 32, 32, 3), by_8)


def test_other_epoch_or_seed_gives_another_order(fake_dir):
  plan = lambda ds, e: ds.train_plan(4, e)['index']
  ds = _build(fake_dir)
  assert not np.array_equal(plan(ds, 0), plan(ds, 1))
  assert not np.array_equal(plan(ds, 0), plan(_build(fake_dir, seed=1), 0))
  # Each epoch is a permutation without repeats (24 examples, 6 x 4).
  assert sorted(plan(ds, 0).ravel()) == list(range(24))
  # Same example, another epoch: another augmentation.
  e0 = list(ds.train_batches(4, 0))
  e1 = list(ds.train_batches(4, 1))
  assert np.abs(_stack(e0) - _stack(e1)).max() > 0.5


def test_hosts_split_the_global_batch(fake_dir):
  """Host p's rows p*b..(p+1)*b of every global batch, augmentation included."""
  whole = list(_build(fake_dir).train_batches(8, epoch=1, sampler='triplet'))
  parts = [list(_build(fake_dir, process_index=p, process_count=2)
                .train_batches(8, epoch=1, sampler='triplet')) for p in range(2)]
  for step, global_batch in enumerate(whole):
    for key, value in global_batch.items():
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, value, err_msg=key)


def test_global_batch_must_divide_over_hosts(fake_dir):
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    _build(fake_dir, process_index=0, process_count=3).train_batches(8, 0)


# ---------------------------------------------------------------- the endless train stream


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_stream_resumes_exactly_and_drops_nothing(fake_dir):
  """Batch 7 of 24 images: each pass is a permutation taken whole (the remainder 3 flows into
  the next batch, it is not dropped), and starting at step k gives steps k.. exactly (images
  included: their augmentation is seeded by pass and position)."""
  ds = _build(fake_dir)
  whole = _take(ds.train_stream(7), 8)  # 56 images: passes 0, 1 and 8 images of pass 2
  ids_of = lambda batches: np.concatenate([b['label'] for b in batches])
  assert len(ids_of(whole)) == 56
  from flowers_jax.data import samplers
  plan = list(zip(range(8), samplers.stream('random', ds.split('train').labels, 7, 0)))
  order = np.concatenate([p['index'] for _, p in plan])
  for first in (0, 24):
    assert sorted(order[first:first + 24]) == list(range(24))  # a whole pass
  assert not np.array_equal(order[:24], order[24:48])  # reshuffled
  resumed = _take(_build(fake_dir, cache=False).train_stream(7, start_step=3), 5)
  for a, b in zip(whole[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_stream_rows_of_two_hosts_join_to_the_global_batch(fake_dir):
  one = _take(_build(fake_dir).train_stream(8, sampler='triplet'), 4)
  parts = [_take(_build(fake_dir, process_index=p, process_count=2)
                 .train_stream(8, sampler='triplet'), 4) for p in range(2)]
  for step, batch in enumerate(one):
    for key, value in batch.items():
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, value, err_msg=key)
