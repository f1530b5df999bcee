"""make_fake_flowers: the raw Flowers102 layout, stratified splits, determinism, the CLI."""

import subprocess
import sys

import numpy as np
import scipy.io
from PIL import Image

from flowers_jax.data import fake


def test_layout_and_mat_files(tmp_path):
  counts = fake.make_fake_flowers(str(tmp_path), num_classes=6, per_class=8, image_size=(40, 52),
                                  seed=0, splits=(0.5, 0.25, 0.25))
  assert counts == {'train': 24, 'validation': 12, 'test': 12}
  labels = scipy.io.loadmat(tmp_path / 'imagelabels.mat')['labels']
  assert labels.shape == (1, 48) and labels.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels[0]), [0] + [8] * 6)  # 1-based
  setid = scipy.io.loadmat(tmp_path / 'setid.mat')
  ids = [setid[k] for k in ('trnid', 'valid', 'tstid')]
  assert [i.shape for i in ids] == [(1, 24), (1, 12), (1, 12)]
  all_ids = np.concatenate([i[0] for i in ids])
  np.testing.assert_array_equal(np.sort(all_ids), np.arange(1, 49))  # a partition
  for i, n in zip(ids, (4, 2, 2)):  # stratified: n per class in each split
    np.testing.assert_array_equal(np.bincount(labels[0][i[0] - 1], minlength=7)[1:], n)
  im = Image.open(tmp_path / 'jpg' / 'image_00048.jpg')
  assert im.format == 'JPEG' and im.size == (52, 40) and im.mode == 'RGB'


def test_deterministic_by_seed(tmp_path):
  for name, seed in [('a', 7), ('b', 7), ('c', 8)]:
    fake.make_fake_flowers(str(tmp_path / name), num_classes=2, per_class=3, image_size=24,
                           seed=seed)
  files = ['imagelabels.mat', 'setid.mat'] + [f'jpg/image_{i:05d}.jpg' for i in range(1, 7)]
  for f in files:
    assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes(), f
  assert any((tmp_path / 'a' / f).read_bytes() != (tmp_path / 'c' / f).read_bytes()
             for f in files[2:])


def test_class_styles_are_distinct():
  styles = [fake.class_style(c, 10) for c in range(10)]
  assert len({s['hue'] for s in styles}) == 10
  hues = np.sort([s['hue'] for s in styles])
  assert np.diff(hues).min() > 0.09  # well apart from the +-0.03 jitter
  styles = [fake.class_style(c, 30) for c in range(30)]
  assert len({s['hue'] for s in styles}) == 12  # beyond 12 classes the shape decides
  assert len({(s['hue'], s['petals'], s['stripe_angle']) for s in styles}) == 30
  styles102 = [fake.class_style(c, 102) for c in range(102)]
  assert len({(s['hue'], s['petals'], s['stripe_angle']) for s in styles102}) == 102


def test_images_vary_within_a_class():
  a = fake.render(2, 10, 48, 48, np.random.default_rng(0)).astype(int)
  b = fake.render(2, 10, 48, 48, np.random.default_rng(1)).astype(int)
  assert a.shape == (48, 48, 3) and np.abs(a - b).mean() > 10


def test_cli(tmp_path):
  out = subprocess.run(
      [sys.executable, 'scripts/make_fake_flowers.py', str(tmp_path), '--num-classes', '3',
       '--per-class', '4', '--image-size', '30x20', '--splits', '0.5,0.5'],
      capture_output=True, text=True, check=True,
      cwd=__file__.rsplit('/tests/', 1)[0]).stdout
  assert 'wrote 12 images of 3 classes' in out and 'train 6, validation 6, test 0' in out
  assert Image.open(tmp_path / 'jpg' / 'image_00001.jpg').size == (30, 20)


def test_package_imports_without_tensorflow():
  code = ('import sys, flowers_jax.data, flowers_jax.data.fake; '
          'assert "tensorflow" not in sys.modules, "data imported tensorflow eagerly"')
  subprocess.run([sys.executable, '-c', code], check=True)
