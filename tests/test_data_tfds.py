"""The 'tfds' source: mocked oxford_flowers102, and a real TFDS build of the fake folder."""

import importlib.resources
import io
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax import normalization
from flowers_jax.data import fake
from flowers_jax.data import pipeline

tf = pipeline.import_tf()  # loads triton first: torchvision after TF would segfault
tfds = pytest.importorskip('tensorflow_datasets')

SIZES = {'train': 6, 'validation': 4, 'test': 5}


def _cfg(**kw):
  """``base_config().data`` with ``kw`` overridden."""
  cfg = config_lib.base_config().data
  cfg.update(kw)
  return cfg


def _build(data_dir='', **kw):
  cfg = _cfg(source='tfds', dir=str(data_dir), image_size=32, **kw)
  return data.build(cfg, seed=0, process_index=0, process_count=1)


def test_mock_data_splits_labels_and_shapes():
  with tfds.testing.mock_data(num_examples=7):
    ds = _build()
  assert ds.num_classes == 102 and len(ds.class_names) == 102
  assert ds.class_names[0] == 'pink primrose' and ds.class_names == data.CLASS_NAMES
  assert ds.num_examples == {'train': 7, 'validation': 7, 'test': 7}
  for split in ('train', 'validation', 'test'):
    labels = ds.splits[split].labels
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 102
  (batch,) = list(ds.train_batches(7, epoch=0))
  assert batch['image'].shape == (7, 32, 32, 3) and batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(np.sort(batch['label']), np.sort(ds.splits['train'].labels))
  batches = list(ds.eval_batches('test', 4))
  assert len(batches) == 2 and batches[1]['mask'].tolist() == [1, 1, 1, 0]


def _grey_png(value, hw=(48, 40)):
  buf = io.BytesIO()
  Image.fromarray(np.full(hw + (3,), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def test_constant_grey_image_normalises_to_expected_values():
  grey = [0, 64, 128, 200, 255]

  def as_dataset(self, split, decoders=None, **kwargs):
    del self, decoders, kwargs
    n = SIZES[str(split)]
    return tf.data.Dataset.from_tensor_slices({
        'image': [_grey_png(grey[i % 5]) for i in range(n)],
        'label': np.arange(n, dtype=np.int64) % 3,
        'file_name': [f'image_{i + 1:05d}.jpg' for i in range(n)]})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    ds = _build(eval_resize=40)
  assert ds.num_examples == SIZES
  np.testing.assert_array_equal(ds.splits['test'].ids, [1, 2, 3, 4, 5])
  (batch,) = list(ds.eval_batches('test', 5))
  mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
  # uint8 batches, normalised on the device with data.mean / data.std (ImageNet's: ()).
  assert ds.config.mean == (0.485, 0.456, 0.406) and batch['image'].dtype == np.uint8
  normalised = np.asarray(normalization.normalize(batch['image'], ds.config.mean, ds.config.std))
  for i, value in enumerate(grey):
    want = (value / 255.0 - mean) / std  # e.g. 128 -> [0.0741, 0.2052, 0.4265]
    np.testing.assert_allclose(normalised[i], np.broadcast_to(want, (32, 32, 3)), atol=1e-5)
  # Random crops and flips of a constant image are that constant too.
  (train,) = list(ds.train_batches(6, epoch=3))
  wants = np.stack([(g / 255.0 - mean) / std for g in grey])
  for image in np.asarray(normalization.normalize(train['image'], mean, std)):
    assert np.ptp(image, axis=(0, 1)).max() < 1e-5
    assert np.abs(wants - image[0, 0]).max(axis=1).min() < 1e-5


@pytest.fixture(scope='module')
def same_files(tmp_path_factory):
  """The fake folder, and TFDS's real oxford_flowers102 builder run on those files."""
  root = tmp_path_factory.mktemp('fake')
  fake.make_fake_flowers(str(root), num_classes=4, per_class=6, image_size=36, seed=5)
  data_dir = tmp_path_factory.mktemp('tfds')
  files = {'images': str(root), 'labels': str(root / 'imagelabels.mat'),
           'setid': str(root / 'setid.mat')}
  from tensorflow_datasets.core import dataset_builder
  # tfds 4.9.10 needs the importlib_resources backport even on Python >= 3.9.
  with mock.patch.object(dataset_builder, 'importlib_resources', importlib.resources), \
       mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         lambda self, urls: files):
    tfds.builder('oxford_flowers102', data_dir=str(data_dir)).download_and_prepare()
  return root, data_dir


def test_tfds_and_folder_agree_on_the_same_files(same_files):
  root, data_dir = same_files
  via_tfds = _build(data_dir)
  via_folder = data.build(_cfg(source='folder', dir=str(root), image_size=32), seed=0,
                          process_index=0, process_count=1)
  assert via_tfds.num_examples == via_folder.num_examples == {
      'train': 12, 'validation': 8, 'test': 4}
  for split in ('train', 'validation', 'test'):
    a, b = via_tfds.splits[split], via_folder.splits[split]
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
  # Same examples in the same order: the same batches for the same seed.
  for a, b in zip(via_tfds.train_batches(4, epoch=1), via_folder.train_batches(4, epoch=1)):
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-5)
  for a, b in zip(via_tfds.eval_batches('test', 4), via_folder.eval_batches('test', 4)):
    for key in ('id', 'label', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-5)
