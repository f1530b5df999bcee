"""RandAugment in TensorFlow: torchvision ``transforms.RandAugment`` on uint8 [H, W, 3].

Source: torchvision 0.29 ``transforms/autoaugment.py`` (``RandAugment``, ``_apply_op``), its
tensor kernels in ``transforms/functional.py`` and ``transforms/_functional_tensor.py``.

- ``OPS``: the 14 ops in torchvision's order, each ``(image uint8 [H, W, 3], magnitude
  float64 []) -> uint8 [H, W, 3]``, computed as ``_apply_op`` computes them on a uint8
  tensor with nearest interpolation and ``fill=None`` (0 outside the image): the colour ops
  in float32 with torchvision's truncations (``_blend`` and the greyscale truncate, the
  sharpness blur rounds), the affine ones on torchvision's sampling grid
  (``_gen_affine_grid`` + ``grid_sample(align_corners=False)``, nearest = half to even).
- ``magnitudes``: ``RandAugment._augmentation_space`` at one bin, torch's float32
  ``linspace`` arithmetic included; translations are a fraction 150/331 of the image side.
- ``choices``: the op indices (uniform on the 14, with replacement) and the signs (negate
  with probability 1/2; used by signed ops only) of one stateless seed.
- ``randaugment``: ``num_ops`` ops chosen by ``choices``, each through ``tf.switch_case``;
  so its output is a pure function of (image, seed).
"""

from __future__ import annotations

import functools
import math

import numpy as np


NAMES = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
         'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize')
# Whether torchvision negates an op's magnitude with probability 1/2.
SIGNED = tuple(name not in ('Identity', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize')
               for name in NAMES)
TRANSLATE = 150.0 / 331.0  # of the image side, at the top bin
_RAD_TO_DEG, _DEG_TO_RAD = 180.0 / math.pi, math.pi / 180.0  # math.degrees / math.radians


def _tf():
  from flowers_jax.data import tf_import
  return tf_import.import_tf()


def _hw(image, dtype):
  tf = _tf()
  shape = tf.shape(image)
  return tf.cast(shape[0], dtype), tf.cast(shape[1], dtype)


# ---------------------------------------------------------------- geometry


def _inverse_affine(center, angle, translate, shear):
  """``functional._get_inverse_affine_matrix(center, angle, translate, 1, shear)``: the
  output -> input matrix, float64 [6]; degrees, centre-relative pixel coordinates."""
  tf = _tf()
  f64 = lambda v: tf.cast(v, tf.float64)
  rot, sx, sy = f64(angle) * _DEG_TO_RAD, f64(shear[0]) * _DEG_TO_RAD, f64(shear[1]) * _DEG_TO_RAD
  (cx, cy), (tx, ty) = map(f64, center), map(f64, translate)
  a = tf.cos(rot - sy) / tf.cos(sy)
  b = -tf.cos(rot - sy) * tf.tan(sx) / tf.cos(sy) - tf.sin(rot)
  c = tf.sin(rot - sy) / tf.cos(sy)
  d = -tf.sin(rot - sy) * tf.tan(sx) / tf.cos(sy) + tf.cos(rot)
  m0, m1, m3, m4 = d, -b, -c, a
  m2 = (0.0 + (m0 * (-cx - tx) + m1 * (-cy - ty))) + cx
  m5 = (0.0 + (m3 * (-cx - tx) + m4 * (-cy - ty))) + cy
  return tf.stack([m0, m1, m2, m3, m4, m5])


def _affine(image, matrix):
  """``_functional_tensor.affine(image, matrix, 'nearest', fill=None)``: uint8 [H, W, 3]
  -> uint8 [H, W, 3]; output pixel (i, j) takes the input pixel nearest (half to even) to
  torchvision's float32 grid point, 0 where that is outside the image."""
  tf = _tf()
  h, w = _hw(image, tf.float32)
  theta = tf.cast(matrix, tf.float32)
  rx, ry = theta[:3] / (0.5 * w), theta[3:] / (0.5 * h)  # _gen_affine_grid's rescaled_theta
  # Pixel centres relative to the image centre (exact), [H, W] each: summing operands of
  # one shape keeps grappler's arithmetic optimizer from reordering the float32 sums
  # (with broadcast [W] + [H, 1] operands it did, moving ~1 in 10^5 rotated pixels).
  x, y = tf.meshgrid(tf.range(w) + 0.5 - 0.5 * w, tf.range(h) + 0.5 - 0.5 * h)
  gx = (x * rx[0] + y * rx[1]) + rx[2]  # torchvision's grid, in [-1, 1] inside
  gy = (x * ry[0] + y * ry[1]) + ry[2]
  ix = tf.round((gx + 1.0) * (0.5 * w) - 0.5)  # grid_sample's unnormalize, align_corners=False
  iy = tf.round((gy + 1.0) * (0.5 * h) - 0.5)
  inside = (ix >= 0) & (ix <= w - 1) & (iy >= 0) & (iy <= h - 1)
  index = tf.cast(tf.stack([tf.clip_by_value(iy, 0, h - 1), tf.clip_by_value(ix, 0, w - 1)], -1),
                  tf.int32)
  out = tf.gather_nd(image, index)
  return tf.where(inside[..., None], out, tf.zeros_like(out))


def _centre(image):
  """torchvision's ``center=[0, 0]`` (the top-left corner) relative to the image centre."""
  h, w = _hw(image, _tf().float64)
  return -0.5 * w, -0.5 * h


def _shear_degrees(magnitude):
  tf = _tf()
  return tf.atan(tf.cast(magnitude, tf.float64)) * _RAD_TO_DEG  # math.degrees(math.atan(m))


def shear_x(image, magnitude):
  """``x_in = x + magnitude * (y + 1/2)``: sheared about the top-left corner."""
  matrix = _inverse_affine(_centre(image), 0.0, (0.0, 0.0), (_shear_degrees(magnitude), 0.0))
  return _affine(image, matrix)


def shear_y(image, magnitude):
  """``y_in = y + magnitude * (x + 1/2)``: sheared about the top-left corner."""
  matrix = _inverse_affine(_centre(image), 0.0, (0.0, 0.0), (0.0, _shear_degrees(magnitude)))
  return _affine(image, matrix)


def _pixels(magnitude):
  tf = _tf()
  return tf.cast(tf.cast(magnitude, tf.int32), tf.float64)  # int(magnitude): towards zero


def translate_x(image, magnitude):
  """Shifted right by ``int(magnitude)`` pixels."""
  return _affine(image, _inverse_affine((0.0, 0.0), 0.0, (_pixels(magnitude), 0.0), (0.0, 0.0)))


def translate_y(image, magnitude):
  """Shifted down by ``int(magnitude)`` pixels."""
  return _affine(image, _inverse_affine((0.0, 0.0), 0.0, (0.0, _pixels(magnitude)), (0.0, 0.0)))


def rotate(image, magnitude):
  """Rotated ``magnitude`` degrees counter-clockwise about the image centre, same size."""
  return _affine(image, _inverse_affine((0.0, 0.0), -magnitude, (0.0, 0.0), (0.0, 0.0)))


# ---------------------------------------------------------------- colour


def _grey(x):
  """``rgb_to_grayscale`` of uint8 as float32 [H, W, 1] (x float32 [H, W, 3]): truncated."""
  tf = _tf()
  r, g, b = tf.unstack(x, axis=-1)
  return tf.floor(0.2989 * r + 0.587 * g + 0.114 * b)[..., None]


def _blend(x, other, factor):
  """``_blend``: ``factor * x + (1 - factor) * other`` in float32, clipped, truncated.
  x float32 [H, W, 3], other broadcastable, factor float64 [] -> uint8 [H, W, 3]."""
  tf = _tf()
  mixed = tf.cast(factor, tf.float32) * x + tf.cast(1.0 - factor, tf.float32) * other
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def identity(image, magnitude):
  del magnitude
  return image


def brightness(image, magnitude):
  """``adjust_brightness(1 + magnitude)``: blend with black."""
  tf = _tf()
  x = tf.cast(image, tf.float32)
  return _blend(x, tf.zeros_like(x), 1.0 + magnitude)


def color(image, magnitude):
  """``adjust_saturation(1 + magnitude)``: blend with the greyscale image."""
  tf = _tf()
  x = tf.cast(image, tf.float32)
  return _blend(x, _grey(x), 1.0 + magnitude)


def contrast(image, magnitude):
  """``adjust_contrast(1 + magnitude)``: blend with the mean grey level (float32)."""
  tf = _tf()
  x = tf.cast(image, tf.float32)
  grey = _grey(x)
  total = tf.reduce_sum(tf.cast(grey, tf.int32))  # exact, whatever the image size
  mean = tf.cast(tf.cast(total, tf.float64) / tf.cast(tf.size(grey), tf.float64), tf.float32)
  return _blend(x, mean, 1.0 + magnitude)


def _smooth(image):
  """``_blurred_degenerate_image``: int32 [H, W, 3], the 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]
  / 13 inside, rounded (exactly: a sum / 13 is never half-way), the border unchanged."""
  tf = _tf()
  x = tf.cast(image, tf.int32)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  total = 4 * x[1:-1, 1:-1]
  for di in range(3):
    for dj in range(3):
      total += x[di:h - 2 + di, dj:w - 2 + dj]
  inner = (2 * total + 13) // 26  # round(total / 13)
  return x + tf.pad(inner - x[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])


def sharpness(image, magnitude):
  """``adjust_sharpness(1 + magnitude)``: blend with ``_smooth``; images with a side <= 2
  unchanged."""
  tf = _tf()
  shape = tf.shape(image)
  blend = lambda: _blend(tf.cast(image, tf.float32), tf.cast(_smooth(image), tf.float32),
                         1.0 + magnitude)
  return tf.cond((shape[0] <= 2) | (shape[1] <= 2), lambda: image, blend)


def posterize(image, magnitude):
  """``posterize(int(magnitude))``: keeps the top ``int(magnitude)`` bits (0..8)."""
  tf = _tf()
  bits = tf.cast(magnitude, tf.int32)
  mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, magnitude):
  """``solarize(magnitude)``: levels >= the threshold (float32) inverted."""
  tf = _tf()
  above = tf.cast(image, tf.float32) >= tf.cast(magnitude, tf.float32)
  return tf.where(above, 255 - image, image)


def autocontrast(image, magnitude):
  """``autocontrast``: each channel's [min, max] stretched to [0, 255] (float32, truncated);
  a constant channel unchanged."""
  del magnitude
  tf = _tf()
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = (1.0 / (hi - lo)) * 255.0  # torch's `255 / t` is `t.reciprocal() * 255`
  flat = ~tf.math.is_finite(scale)
  lo, scale = tf.where(flat, 0.0, lo), tf.where(flat, 1.0, scale)
  return tf.cast(tf.clip_by_value((x - lo) * scale, 0.0, 255.0), tf.uint8)


def _equalize_channel(channel):
  """``_scale_channel``: uint8 [H, W] through its histogram's integer lookup table."""
  tf = _tf()
  levels = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(levels, [-1]), minlength=256, maxlength=256)
  step = (tf.size(levels) - hist[tf.reduce_max(levels)]) // 255  # all but the top level
  lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step == 0, channel, tf.cast(tf.gather(lut, levels), tf.uint8))


def equalize(image, magnitude):
  """``equalize``: per-channel histogram equalisation, torchvision's integer arithmetic."""
  del magnitude
  tf = _tf()
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


OPS = dict(zip(NAMES, (identity, shear_x, shear_y, translate_x, translate_y, rotate, brightness,
                       color, contrast, sharpness, posterize, solarize, autocontrast, equalize)))


# ---------------------------------------------------------------- the policy


def _linspace_at(start, end, bins, i):
  """``torch.linspace(start, end, bins)[i]`` as float64: torch's CPU kernel takes a float32
  step, then rounds ``start + step * i`` (``end - step * (bins - 1 - i)`` in the upper half)
  once to float32. start/end float32 []."""
  tf = _tf()
  step = tf.cast((end - start) / float(bins - 1), tf.float64)
  if i < bins // 2:
    value = tf.cast(start, tf.float64) + step * i
  else:
    value = tf.cast(end, tf.float64) - step * (bins - 1 - i)
  return tf.cast(tf.cast(value, tf.float32), tf.float64)


def magnitudes(shape, magnitude, num_bins):
  """``RandAugment._augmentation_space(num_bins, (H, W))``, each op's entry at bin
  ``magnitude`` (unsigned), as float64 [14] in ``NAMES`` order; shape int [>=2]."""
  tf = _tf()
  f32 = lambda v: tf.constant(v, tf.float32)
  lin = lambda end, start=0.0: _linspace_at(f32(start), end, num_bins, magnitude)
  side = lambda n: tf.cast(TRANSLATE * tf.cast(n, tf.float64), tf.float32)
  bits = 8 - int(np.round(np.float32(magnitude) / np.float32((num_bins - 1) / 4)))  # float32
  zero = tf.constant(0.0, tf.float64)
  shear, colour = lin(f32(0.3)), lin(f32(0.9))
  return tf.stack([zero, shear, shear, lin(side(shape[1])), lin(side(shape[0])), lin(f32(30.0)),
                   colour, colour, colour, colour, tf.constant(float(bits), tf.float64),
                   lin(f32(0.0), 255.0), zero, zero])


def choices(seed, num_ops):
  """The draws of ``RandAugment.forward``: op indices int32 [num_ops] (uniform on the 14,
  with replacement) and negate bool [num_ops] (probability 1/2) from stateless seed [2]."""
  tf = _tf()
  s_op, s_sign = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  ops = tf.random.stateless_uniform([num_ops], s_op, 0, len(NAMES), tf.int32)
  negate = tf.random.stateless_uniform([num_ops], s_sign, 0, 2, tf.int32) == 1
  return ops, negate


def apply_op(image, index, magnitude):
  """``OPS[NAMES[index]](image, magnitude)`` for an int32 [] index (``tf.switch_case``)."""
  tf = _tf()
  out = tf.switch_case(index, [functools.partial(fn, image, magnitude) for fn in OPS.values()])
  return tf.ensure_shape(out, image.shape)


def randaugment(image, seed, num_ops=2, magnitude=9, num_bins=31):
  """torchvision ``RandAugment(num_ops, magnitude, num_bins)`` (nearest, fill 0): uint8
  [H, W, 3] -> uint8 [H, W, 3]; ``0 <= magnitude < num_bins``, ``num_bins >= 2``."""
  tf = _tf()
  table = magnitudes(tf.shape(image), magnitude, num_bins)
  ops, negate = choices(seed, num_ops)
  for k in range(num_ops):
    value = table[ops[k]]
    value = tf.where(tf.gather(SIGNED, ops[k]) & negate[k], -value, value)
    image = apply_op(image, ops[k], value)
  return image
