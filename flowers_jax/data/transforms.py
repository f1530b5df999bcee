"""Per-example image transforms in TensorFlow, after torchvision's presets.

All functions take and return single images ``[H, W, 3]``; random ones take a
stateless seed ``int64 [2]`` so an example's augmentation is a pure function of
``(seed, epoch, position)`` (see ``pipeline.example_seed``).

- ``random_resized_crop_window``: ``torchvision.transforms.RandomResizedCrop.get_params``
  (10 tries of scale x log-ratio, then the central fallback), vectorised.
- ``resize_shorter`` / ``center_crop``: ``Resize(int)`` and ``CenterCrop`` with
  torchvision's integer rounding (long side ``int(short' * long / short)``, crop top
  ``round((H - h) / 2)``).
- Resizing uses ``tf.image.resize(antialias=True)``, the closest match to PIL's
  filters (torchvision on PIL images): bilinear is within 1 grey level of PIL,
  bicubic within ~0.2 levels on average (TF's and PIL's cubic kernels differ when
  upsampling; torch tensors use a=-0.75). Results are rounded and clipped to
  [0, 255] as a uint8 PIL pipeline would be. Antialiasing costs ~2x in throughput.
- Random ops draw their parameters in functions of their own (``random_resized_crop_window``,
  ``flip_coin``, ``random_erasing_draws``): ``pp.Pipeline.draw`` computes them alone, for the
  device path (``device_pp``), from the same seeds.
- ``random_crop``: ``RandomCrop(size, padding)`` (zero padding, uniform offsets).
- ``random_erasing``: ``RandomErasing(p, scale, ratio)`` (``transforms.py``'s
  ``get_params``: 10 tries of area fraction x log-ratio, erase where the box fits), on uint8
  before normalisation: see its docstring for the fill values.
- ``normalize``: ``/255``, minus the mean, over the std (ImageNet's by default); the host
  reference of the device-side ``flowers_jax.normalization`` (batches travel as uint8).
"""

from __future__ import annotations

import math


from flowers_jax.normalization import IMAGENET_MEAN  # noqa: E402  (jax only, no TensorFlow)
from flowers_jax.normalization import IMAGENET_STD  # noqa: E402
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'area')
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_TRIES = 10
ERASE_VALUES = ('mean', 'random')
# The ImageNet mean in uint8: 0 after normalisation, to half a grey level.
MEAN_UINT8 = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)


def _tf():
  from flowers_jax.data import tf_import
  return tf_import.import_tf()


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8/float [H, W, 3] in [0, 255] -> float32 normalised: the host reference of
  ``flowers_jax.normalization.normalize`` (the pipeline's batches stay uint8)."""
  tf = _tf()
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def resize(image, height, width, interpolation='bilinear'):
  """uint8 [H, W, 3] -> uint8 [height, width, 3], antialiased, rounded."""
  tf = _tf()
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'Unknown interpolation {interpolation!r}; valid: {INTERPOLATIONS}')
  x = tf.image.resize(image, tf.stack([height, width]), method=interpolation,
                      antialias=True)
  x = tf.cast(x, tf.float32)  # 'nearest' keeps uint8
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def resize_shorter_size(shape, size):
  """torchvision ``Resize(size)``'s output (height, width) for image shape [H, W, ...]."""
  tf = _tf()
  h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  short, long_ = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(tf.math.floor(size * long_ / short), tf.int32)
  return tf.cond(h <= w, lambda: (tf.constant(size), new_long),
                 lambda: (new_long, tf.constant(size)))


def center_crop_window(shape, size):
  """(top, left, size, size) of torchvision ``CenterCrop(size)``; image must be >= size."""
  tf = _tf()
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  # torchvision: int(round((H - h) / 2.0)); Python rounds half to even like tf.round.
  top = tf.cast(tf.round((h - size) / 2.0), tf.int32)
  left = tf.cast(tf.round((w - size) / 2.0), tf.int32)
  return top, left, size, size


def resize_shorter(image, size, interpolation='bilinear'):
  """torchvision ``Resize(size)``: uint8 [H, W, 3] -> shorter side ``size``, uint8."""
  tf = _tf()
  h, w = resize_shorter_size(tf.shape(image), size)
  return resize(image, h, w, interpolation)


def center_crop(image, size):
  """torchvision ``CenterCrop(size)``: [H, W, 3] -> [size, size, 3]; a side shorter than
  ``size`` is zero-padded first, the odd pixel at the bottom / right (as torchvision does)."""
  tf = _tf()
  shape = tf.shape(image)
  pad_h, pad_w = tf.maximum(size - shape[0], 0), tf.maximum(size - shape[1], 0)
  image = tf.pad(image, [[pad_h // 2, (pad_h + 1) // 2], [pad_w // 2, (pad_w + 1) // 2], [0, 0]])
  top, left, h, w = center_crop_window(tf.shape(image), size)
  return tf.image.crop_to_bounding_box(image, top, left, h, w)


def random_resized_crop_window(shape, seed, scale=RRC_SCALE, ratio=RRC_RATIO, tries=10):
  """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w) int32 scalars.

  Args:
    shape: int [>=2], the image's [H, W, ...].
    seed: stateless seed int [2].
  """
  tf = _tf()
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  area = height * width
  s_area, s_ratio, s_top, s_left = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  target_area = area * tf.random.stateless_uniform([tries], s_area, scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform(
      [tries], s_ratio, math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  w = tf.round(tf.sqrt(target_area * aspect))
  h = tf.round(tf.sqrt(target_area / aspect))
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)

  # Fallback: whole image, clamped to the ratio range, centred.
  in_ratio = width / height
  fw = tf.where(in_ratio < ratio[0], width,
                tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
  fh = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  first = tf.argmax(tf.cast(ok, tf.int32))
  any_ok = tf.reduce_any(ok)
  ch = tf.cast(tf.where(any_ok, h[first], fh), tf.int32)
  cw = tf.cast(tf.where(any_ok, w[first], fw), tf.int32)
  ih, iw = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  # randint(0, H - h + 1) is uniform on [0, H - h].
  top = tf.where(any_ok, tf.random.stateless_uniform([], s_top, 0, ih - ch + 1, tf.int32),
                 (ih - ch) // 2)
  left = tf.where(any_ok, tf.random.stateless_uniform([], s_left, 0, iw - cw + 1, tf.int32),
                  (iw - cw) // 2)
  return top, left, ch, cw


def random_resized_crop(image, size, seed, scale=RRC_SCALE, ratio=RRC_RATIO,
                        interpolation='bilinear'):
  """torchvision ``RandomResizedCrop(size)``: uint8 [H, W, 3] -> uint8 [size, size, 3]."""
  tf = _tf()
  top, left, h, w = random_resized_crop_window(tf.shape(image), seed, scale, ratio)
  return resize(image[top:top + h, left:left + w], size, size, interpolation)


def random_crop(image, size, seed, padding=0):
  """torchvision ``RandomCrop(size, padding)``: [H, W, 3] -> [size, size, 3].

  Zero-pads each border by ``padding``, then crops at a uniform random offset; the
  padded image must be at least ``size`` on both sides.
  """
  tf = _tf()
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  shape = tf.shape(image)
  s_top, s_left = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  top = tf.random.stateless_uniform([], s_top, 0, shape[0] - size + 1, tf.int32)
  left = tf.random.stateless_uniform([], s_left, 0, shape[1] - size + 1, tf.int32)
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def flip_coin(seed):
  """``random_flip``'s draw from stateless seed int [2]: bool scalar, True (flip) w.p. 1/2."""
  tf = _tf()
  return tf.random.stateless_uniform([], seed) < 0.5


def random_flip(image, seed):
  """Horizontal flip with probability 1/2 (stateless): ``flip_coin(seed)`` decides."""
  tf = _tf()
  return tf.cond(flip_coin(seed), lambda: tf.reverse(image, [1]), lambda: image)


def random_erasing_draws(seed, tries=ERASE_TRIES):
  """The uniforms [0, 1) of one ``RandomErasing.get_params`` from stateless seed [2]:
  (area float32 [tries], log-ratio float32 [tries], top and left float32 [2])."""
  tf = _tf()
  s_area, s_ratio, s_pos = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  uniform = tf.random.stateless_uniform
  return uniform([tries], s_area), uniform([tries], s_ratio), uniform([2], s_pos)


def random_erasing_box(shape, u_area, u_ratio, u_pos, scale=ERASE_SCALE, ratio=ERASE_RATIO):
  """torchvision ``RandomErasing.get_params`` from its uniforms (``random_erasing_draws``):
  (top, left, h, w, found), int32 scalars and a bool; (0, 0, H, W, False) when no try fits.

  Try k: area fraction ``scale[0] + (scale[1] - scale[0]) * u_area[k]`` and aspect
  ``exp(log-uniform)`` in float32 as ``torch.empty(1).uniform_`` gives them, then in float64
  ``h = round(sqrt(H * W * fraction * aspect))``, ``w = round(sqrt(H * W * fraction /
  aspect))``; the first try with ``h < H and w < W`` wins, at ``top = floor(u_pos[0] * (H - h
  + 1))`` (``torch.randint(0, H - h + 1)``), ``left`` alike.
  """
  tf = _tf()
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float64)
  s0, s1 = tf.constant(scale[0], tf.float32), tf.constant(scale[1], tf.float32)
  r0, r1 = tf.unstack(tf.math.log(tf.constant(ratio, tf.float32)))
  fraction = tf.cast(s0 + (s1 - s0) * u_area, tf.float64)
  aspect = tf.cast(tf.exp(r0 + (r1 - r0) * u_ratio), tf.float64)
  h = tf.cast(tf.round(tf.sqrt(area * fraction * aspect)), tf.int32)  # round: half to even
  w = tf.cast(tf.round(tf.sqrt(area * fraction / aspect)), tf.int32)
  ok = (h < height) & (w < width)
  first, found = tf.argmax(tf.cast(ok, tf.int32)), tf.reduce_any(ok)
  h, w = h[first], w[first]
  offset = lambda u, n: tf.minimum(tf.cast(tf.floor(u * tf.cast(n + 1, tf.float32)), tf.int32), n)
  top, left = offset(u_pos[0], height - h), offset(u_pos[1], width - w)
  where = lambda a, b: tf.where(found, a, b)
  return where(top, 0), where(left, 0), where(h, height), where(w, width), found


def _erase(image, box, value, seed):
  """image uint8 [H, W, 3] with box (top, left, h, w) filled with ``value``'s pixels."""
  tf = _tf()
  top, left, h, w = box
  shape = tf.shape(image)
  rows, cols = tf.range(shape[0]), tf.range(shape[1])
  inside = (((rows >= top) & (rows < top + h))[:, None]
            & ((cols >= left) & (cols < left + w))[None, :])
  if value == 'mean':
    fill = tf.constant(MEAN_UINT8, tf.uint8)
  else:  # 'random'
    noise = tf.random.stateless_normal(shape, seed)
    level = 255.0 * (tf.constant(IMAGENET_MEAN) + tf.constant(IMAGENET_STD) * noise)
    fill = tf.cast(tf.clip_by_value(tf.round(level), 0.0, 255.0), tf.uint8)
  return tf.where(inside[..., None], fill, image)


def random_erasing(image, seed, p=0.25, scale=ERASE_SCALE, ratio=ERASE_RATIO, value='mean'):
  """torchvision ``RandomErasing(p, scale, ratio, value)`` on uint8 [H, W, 3], before
  normalisation: uint8 [H, W, 3], with probability ``p`` a ``random_erasing_box`` filled.

  value: 'mean' fills the box with ``MEAN_UINT8``, which normalises to torchvision's
    default ``value=0`` on a normalised tensor (within 0.5 / 255 / std < 0.009);
    'random' with ``255 * (mean + std * N(0, 1))`` per pixel and channel, rounded and
    clipped to [0, 255]: after normalisation timm's ``RandomErasing(mode='pixel')`` noise
    N(0, 1), but clipped to the range an image can hold ([-2.12, 2.25] for red,
    [-2.04, 2.43] green, [-1.80, 2.64] blue) and quantised to 1 / (255 std).
  """
  tf = _tf()
  if value not in ERASE_VALUES:
    raise ValueError(f'random_erasing value={value!r}; valid: {ERASE_VALUES}')
  s_p, s_box, s_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  *box, found = random_erasing_box(tf.shape(image), *random_erasing_draws(s_box), scale, ratio)
  erase = (tf.random.stateless_uniform([], s_p) < p) & found
  return tf.cond(erase, lambda: _erase(image, box, value, s_noise), lambda: image)
