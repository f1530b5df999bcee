"""A synthetic Flowers102 look-alike in the raw Oxford layout, for demos and tests.

``make_fake_flowers(out_dir, ...)`` writes::

  out_dir/jpg/image_00001.jpg ...   # N = num_classes * per_class JPEGs
  out_dir/imagelabels.mat           # 'labels': [1, N] uint8, 1-based class of image i
  out_dir/setid.mat                 # 'trnid', 'valid', 'tstid': [1, n] uint16, 1-based ids

Each class has its own combination of petal hue (12 hues, shared beyond 12
classes), petal count, stripe orientation and centre colour; each image draws the
flower's position, size, rotation, a hue jitter, a random gradient background and
pixel noise, so no fixed pixel gives the class away (the best single pixel is right
about 3 times in 4 on 10 classes), while a small CNN learns the colours in its
first epoch and the shapes after. Splits are stratified: every
class contributes ``round(per_class * fraction)`` images to train and validation,
the rest to test. Everything is a function of ``seed``.
"""

from __future__ import annotations

import colorsys
import os
from typing import Sequence

import numpy as np

_GOLDEN = 0.618033988749895
_SPLIT_KEYS = ('trnid', 'valid', 'tstid')


_PETALS = (3, 6, 4, 8, 5, 7)


def class_style(c: int, num_classes: int) -> dict:
  """The class-dependent part of an image: hue in [0, 1), petals, stripe angle, centre.

  ``min(12, num_classes)`` evenly spaced hues; beyond 12 classes, classes share
  hues and ``c // 12`` picks the shape (petal count, stripe angle, centre colour).
  """
  num_hues = max(1, min(12, num_classes))
  k = c // num_hues
  return dict(hue=(c % num_hues) / num_hues + 0.02,
              petals=_PETALS[k % len(_PETALS)] + 4 * (k // len(_PETALS)),
              stripe_angle=np.pi * ((k * _GOLDEN) % 1.0),
              dark_center=bool(k % 2))


def _hsv(h, s, v) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def render(c: int, num_classes: int, height: int, width: int,
           rng: np.random.Generator) -> np.ndarray:
  """One image of class ``c``: uint8 [height, width, 3]."""
  style = class_style(c, num_classes)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  size = float(min(height, width))

  # Background: a random low-saturation colour with a random smooth gradient.
  bg = _hsv(rng.uniform(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.8))
  gx, gy = (rng.normal(0, 40, size=2) / size).astype(np.float32)
  img = bg + ((xx - width / 2) * gx + (yy - height / 2) * gy)[..., None]

  # Flower: a rose curve with `petals` lobes, striped, around a centre disc.
  cy, cx = np.float32(rng.uniform(0.3, 0.7, size=2) * (height, width))
  radius = np.float32(rng.uniform(0.25, 0.42) * size)
  dy, dx = yy - cy, xx - cx
  rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx) + np.float32(rng.uniform(0, 2 * np.pi))
  petal = rho < radius * (0.35 + 0.65 * np.abs(np.cos(style['petals'] * theta / 2)))
  period = np.float32(rng.uniform(0.12, 0.2) * size)
  a = np.float32(style['stripe_angle'])
  stripes = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period) > 0
  colour = _hsv(style['hue'] + rng.uniform(-0.03, 0.03), rng.uniform(0.7, 1.0),
                rng.uniform(0.75, 1.0))
  flower = np.where(stripes[..., None], colour, colour * 0.55)
  img = np.where(petal[..., None], flower, img)
  centre = _hsv(0.12, 0.9, 0.25 if style['dark_center'] else 0.95)
  img = np.where((rho < 0.22 * radius)[..., None], centre, img)

  img += 10 * rng.standard_normal(size=img.shape, dtype=np.float32)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _image_hw(image_size) -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  height, width = image_size
  return int(height), int(width)


def make_fake_flowers(out_dir: str, num_classes: int = 10, per_class: int = 24,
                      image_size: int | Sequence[int] = 96, seed: int = 0,
                      splits: Sequence[float] = (0.5, 0.25, 0.25),
                      quality: int = 90) -> dict[str, int]:
  """Writes the synthetic set; returns ``{'train': n, 'validation': n, 'test': n}``.

  Args:
    out_dir: created if missing; existing files of the same names are overwritten.
    num_classes: number of classes (labels 1..num_classes in imagelabels.mat).
    per_class: images per class.
    image_size: int (square) or (height, width).
    seed: everything (pixels, labels, ids, splits) is a function of it.
    splits: fractions of each class for train, validation (the rest is test).
  """
  import scipy.io
  from PIL import Image

  if len(splits) not in (2, 3) or min(splits) < 0 or sum(splits[:2]) > 1 + 1e-9:
    raise ValueError(f'splits must be 2 or 3 non-negative fractions for train,'
                     f' validation[, test] summing to <= 1, got {tuple(splits)}')
  height, width = _image_hw(image_size)
  n = num_classes * per_class
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))  # image i-1
  n_train, n_val = (int(round(per_class * f)) for f in splits[:2])
  n_val = min(n_val, per_class - n_train)
  setid = {k: [] for k in _SPLIT_KEYS}
  for c in range(num_classes):
    ids = rng.permutation(np.flatnonzero(labels == c) + 1)
    for key, part in zip(_SPLIT_KEYS, np.split(ids, [n_train, n_train + n_val])):
      setid[key].extend(part.tolist())

  os.makedirs(os.path.join(out_dir, 'jpg'), exist_ok=True)
  for i, c in enumerate(labels):
    img = render(int(c), num_classes, height, width, np.random.default_rng([seed, i]))
    Image.fromarray(img).save(
        os.path.join(out_dir, 'jpg', 'image_%05d.jpg' % (i + 1)), quality=quality)
  label_dtype = np.uint8 if num_classes < 256 else np.uint16
  scipy.io.savemat(os.path.join(out_dir, 'imagelabels.mat'),
                   {'labels': (labels + 1).astype(label_dtype)[None]})
  id_dtype = np.uint16 if n < 65536 else np.uint32
  scipy.io.savemat(os.path.join(out_dir, 'setid.mat'),
                   {k: np.sort(np.asarray(v, id_dtype))[None] for k, v in setid.items()})
  return {name: len(setid[k]) for name, k in zip(('train', 'validation', 'test'), _SPLIT_KEYS)}
