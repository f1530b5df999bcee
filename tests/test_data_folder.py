"""The 'folder' source on make_fake_flowers output: splits, labels, eval exactness, errors."""

import os
import shutil

import numpy as np
import pytest
import scipy.io

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax.data import fake
from flowers_jax.data import sources


def _cfg(root, **kw):
  """``base_config().data`` on the folder at ``root``, with ``kw`` overridden."""
  cfg = config_lib.base_config().data
  cfg.update(dict(dict(source='folder', dir=str(root), image_size=32), **kw))
  return cfg


def _build(root, **kw):
  pidx, pcount = kw.pop('process_index', 0), kw.pop('process_count', 1)
  return data.build(_cfg(root, **kw), seed=0, process_index=pidx, process_count=pcount)


@pytest.fixture(scope='module')
def fake_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('fake')
  counts = fake.make_fake_flowers(str(root), num_classes=5, per_class=8, image_size=40, seed=1)
  assert counts == {'train': 20, 'validation': 10, 'test': 10}
  return root


@pytest.fixture(scope='module')
def eval37_dir(tmp_path_factory):
  """37 classes x 4 images: 74 train, 37 validation, 37 test."""
  root = tmp_path_factory.mktemp('fake37')
  fake.make_fake_flowers(str(root), num_classes=37, per_class=4, image_size=32, seed=2)
  return root


def test_splits_and_labels_match_the_mat_files(fake_dir):
  ds = _build(fake_dir)
  assert ds.num_examples == {'train': 20, 'validation': 10, 'test': 10}
  assert ds.num_classes == 5 and ds.class_names[0] == 'class_000'
  labels = scipy.io.loadmat(fake_dir / 'imagelabels.mat')['labels'][0]
  setid = scipy.io.loadmat(fake_dir / 'setid.mat')
  for split, key in [('train', 'trnid'), ('validation', 'valid'), ('test', 'tstid')]:
    ids = setid[key][0]
    np.testing.assert_array_equal(ds.splits[split].ids, ids)
    np.testing.assert_array_equal(ds.splits[split].labels, labels[ids - 1].astype(int) - 1)
  # Eval batches carry those labels in order.
  batch = next(ds.eval_batches('validation', 10))
  np.testing.assert_array_equal(batch['id'], setid['valid'][0])
  np.testing.assert_array_equal(batch['label'], labels[setid['valid'][0] - 1] - 1)
  assert batch['image'].shape == (10, 32, 32, 3) and batch['image'].dtype == np.uint8


def _train_epoch_ids(ds, batch_size, epoch=0):
  """(example ids, labels) of epoch `epoch`'s train rows, in order: without augmentation a
  train image is its eval view, so each row is matched to the eval image it equals."""
  views = next(ds.eval_batches('train', ds.num_examples['train']))
  flat_views = views['image'].reshape(len(views['id']), -1).astype(np.float32)
  ids, labels = [], []
  for batch in ds.train_batches(batch_size, epoch):
    for image, label in zip(batch['image'], batch['label']):
      dist = np.abs(flat_views - image.reshape(1, -1).astype(np.float32)).max(axis=1)
      assert dist.min() < 1e-5, 'a train image equals no eval view'
      ids.append(int(views['id'][dist.argmin()]))
      labels.append(int(label))
  return ids, labels


def test_train_batch_shapes_and_steps(fake_dir):
  ds = _build(fake_dir)
  assert ds.steps_per_epoch(8) == 2
  batches = list(ds.train_batches(8, epoch=0))
  assert len(batches) == 2
  b = batches[0]
  # uint8 pixels: a quarter of float32's bytes; the steps normalise them on the device.
  assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.uint8
  assert b['label'].dtype == np.int32 and b['mask'].dtype == np.float32
  np.testing.assert_array_equal(b['mask'], 1.0)
  assert 0 < b['image'].std()
  # 16 distinct train examples in an epoch of 2 x 8 (drop remainder of 20), with their labels.
  ids, labels = _train_epoch_ids(_build(fake_dir, pp_train='none'), 8)
  assert len(ids) == 16 and len(set(ids)) == 16
  split = ds.splits['train']
  truth = dict(zip(split.ids.tolist(), split.labels.tolist()))
  assert set(ids) <= set(truth) and labels == [truth[i] for i in ids]


def test_eval_exact_over_hosts_and_devices(eval37_dir):
  """37 images, global batch 8, 2 hosts x 2 devices: every id once, exact accuracy."""
  hosts = [_build(eval37_dir, process_index=p, process_count=2) for p in range(2)]
  split = hosts[0].splits['validation']
  assert len(split) == 37
  truth = dict(zip(split.ids.tolist(), split.labels.tolist()))
  # A fake predictor: right on even ids, wrong on odd ones.
  predict = lambda ids, labels: np.where(ids % 2 == 0, labels, (labels + 1) % 37)
  seen, correct, total = [], 0.0, 0.0
  per_host = [list(h.eval_batches('validation', 8)) for h in hosts]
  assert [len(x) for x in per_host] == [5, 5]  # ceil(37 / 8)
  for step in range(5):
    for host in per_host:
      batch = host[step]
      assert batch['image'].shape == (4, 32, 32, 3)
      for dev in range(2):  # split the host batch over 2 local devices
        rows = slice(2 * dev, 2 * dev + 2)
        ids, labels, mask = batch['id'][rows], batch['label'][rows], batch['mask'][rows]
        seen += ids[mask > 0].tolist()
        correct += float(((predict(ids, labels) == labels) * mask).sum())
        total += float(mask.sum())
  assert sorted(seen) == sorted(truth)
  assert total == 37
  direct = np.mean([predict(np.array(i), np.array(y)) == y for i, y in truth.items()])
  assert correct / total == pytest.approx(direct)
  # The padded rows are exactly the last 3 of the global batch.
  last = np.concatenate([per_host[0][-1]['mask'], per_host[1][-1]['mask']])
  np.testing.assert_array_equal(last, [1, 1, 1, 1, 1, 0, 0, 0])


def test_eval_cache_gives_identical_batches(fake_dir):
  ds = _build(fake_dir)
  first = list(ds.eval_batches('test', 4))
  second = list(ds.eval_batches('test', 4))
  ds_nocache = _build(fake_dir, cache=False)
  third = list(ds_nocache.eval_batches('test', 4))
  for a, b, c in zip(first, second, third):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['image'], c['image'])


def test_missing_dir_and_files(fake_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    _build(tmp_path / 'nope')
  root = tmp_path / 'copy'
  shutil.copytree(fake_dir, root)
  os.remove(root / 'setid.mat')
  with pytest.raises(FileNotFoundError, match=r'Missing setid\.mat.*imagelabels\.mat'):
    _build(root)
  shutil.copy(fake_dir / 'setid.mat', root)
  os.remove(root / 'jpg' / 'image_00003.jpg')
  with pytest.raises(FileNotFoundError, match='image_00003.jpg'):
    _build(root)


def test_unknown_source_and_bad_labels(fake_dir, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown.*'nope'.*folder.*imagefolder.*tfds"):
    data.build(_cfg(fake_dir, source='nope'), process_index=0, process_count=1)
  root = tmp_path / 'copy'
  shutil.copytree(fake_dir, root)
  labels = scipy.io.loadmat(root / 'imagelabels.mat')['labels']
  labels[0, 4] = 0
  scipy.io.savemat(root / 'imagelabels.mat', {'labels': labels})
  with pytest.raises(ValueError, match='Label out of range.*image 5 has label 0'):
    _build(root)


def test_batch_larger_than_split_names_it(fake_dir):
  ds = _build(fake_dir)
  with pytest.raises(ValueError, match="'train' has 20 examples.*batch of 32"):
    ds.train_batches(32, 0)


def _corrupt_copy(fake_dir, tmp_path, how):
  root = tmp_path / how
  shutil.copytree(fake_dir, root)
  ids = scipy.io.loadmat(root / 'setid.mat')['trnid'][0]
  path = root / 'jpg' / ('image_%05d.jpg' % ids[3])
  raw = path.read_bytes()
  path.write_bytes(b'this is not a jpeg' if how == 'garbage' else raw[:len(raw) * 2 // 3])
  if how == 'truncated':  # the header survives: only decoding finds the damage
    sources.image_header(path.read_bytes())
  return root, path


@pytest.mark.parametrize('how', ['garbage', 'truncated'])
def test_corrupt_image_is_named(fake_dir, tmp_path, how):
  root, path = _corrupt_copy(fake_dir, tmp_path, how)
  with pytest.raises(ValueError, match=f'Corrupt image {path}'):
    ds = _build(root)  # garbage: caught by the header check
    list(ds.train_batches(4, 0))  # truncated: caught at decode


def test_corrupt_image_named_without_cache(fake_dir, tmp_path):
  root, path = _corrupt_copy(fake_dir, tmp_path, 'truncated')
  ds = _build(root, cache=False)
  with pytest.raises(ValueError, match=f'Corrupt image {path}'):
    for _ in ds.train_batches(4, 0):
      pass


@pytest.mark.parametrize('how', ['garbage', 'truncated'])
def test_skip_corrupt(fake_dir, tmp_path, how, caplog):
  root, path = _corrupt_copy(fake_dir, tmp_path, how)
  ds = _build(root, skip_corrupt=True)
  assert ds.num_examples['train'] == 19 and ds.skipped['train'] == 1
  assert ds.skipped['validation'] == 0
  assert str(path) not in ds.splits['train'].names
  assert 'Skipping 1 corrupt image' in caplog.text
  assert len(list(ds.train_batches(4, 0))) == 4


def test_empty_split(tmp_path):
  fake.make_fake_flowers(str(tmp_path), num_classes=2, per_class=4, image_size=32, seed=0,
                         splits=(0.5, 0.5))
  ds = _build(tmp_path)
  assert ds.num_examples == {'train': 4, 'validation': 4, 'test': 0}
  assert list(ds.eval_batches('test', 4)) == []
