"""The 'imagefolder' source: DIR/<split>/<class>/*.jpg|png."""

import numpy as np
import pytest
from PIL import Image

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax.data import fake


def _write(root, split, cls, n, ext, c):
  d = root / split / cls
  d.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    img = fake.render(c, 3, 30, 40, np.random.default_rng([c, i, len(split)]))
    Image.fromarray(img).save(d / f'{i:02d}.{ext}')


def _cfg(**kw):
  """``base_config().data`` with ``kw`` overridden."""
  cfg = config_lib.base_config().data
  cfg.update(kw)
  return cfg


def _build(root, **kw):
  return data.build(_cfg(source='imagefolder', dir=str(root), image_size=24, **kw), seed=0,
                    process_index=0, process_count=1)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('imgs')
  for c, cls in enumerate(['tulip', 'daisy', 'rose']):
    _write(root, 'train', cls, 4, 'png' if c == 1 else 'jpg', c)
    _write(root, 'val', cls, 2, 'jpg', c)
  (root / 'train' / 'daisy' / 'notes.txt').write_text('not an image, ignored')
  return root


def test_classes_splits_and_labels(folder):
  ds = _build(folder)
  assert ds.class_names == ('daisy', 'rose', 'tulip') and ds.num_classes == 3
  assert ds.num_examples == {'train': 12, 'validation': 6}
  np.testing.assert_array_equal(ds.splits['train'].labels, [0] * 4 + [1] * 4 + [2] * 4)
  np.testing.assert_array_equal(ds.splits['validation'].labels, [0, 0, 1, 1, 2, 2])
  (batch,) = list(ds.eval_batches('validation', 6))
  np.testing.assert_array_equal(batch['label'], [0, 0, 1, 1, 2, 2])
  assert batch['image'].shape == (6, 24, 24, 3)
  train = list(ds.train_batches(4, 0))  # PNGs (daisy) decode like JPEGs
  assert len(train) == 3
  assert sorted(np.concatenate([b['label'] for b in train]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
  with pytest.raises(ValueError, match=r"Unknown split 'test'.*\['train', 'validation'\]"):
    ds.eval_batches('test', 4)


def test_errors(folder, tmp_path):
  with pytest.raises(FileNotFoundError, match='Missing .*train'):
    _build(tmp_path)
  _write(tmp_path, 'train', 'a', 2, 'jpg', 0)
  _write(tmp_path, 'validation', 'b', 2, 'jpg', 1)
  with pytest.raises(ValueError, match='not a class of the train split'):
    _build(tmp_path)
