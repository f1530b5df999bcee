"""A split's images held on the accelerators, for train augmentation there (``device_pp``).

  cache = ds.device_cache('train')     # Dataset: decoded once, shrunk, packed (host numpy)
  cache.nbytes, fits(cache.nbytes)     # what one device holds; whether 'auto' may use it
  arrays = cache.place(NamedSharding(mesh, P()))   # one copy per device (device_pp.Augmenter)

Size: each image's shorter side is brought to ``size`` = ``data.device_cache_size`` (default
2 x image_size S) with the host's antialiased resize and ``data.interpolation``; an image whose
shorter side is already at most ``size`` is kept as it is, never enlarged: upsampling adds no
detail, and the augmentation's one resample then reads the original pixels, as the host path
does. Why 2 S: a random_resized_crop of area fraction ``a`` of an image of shorter side ``short``
has a side of about ``sqrt(a) * short``; with ``short = 2 S`` it is downscaled to S (so no detail
is lost against the original) for every ``a >= 1/4``, and smaller crops, which the original
would upscale too, lose little. Flowers102's originals have a shorter side of ~500, so 448 at
S=224 keeps nearly all of it: 1020 train images, ~0.8 GB of uint8.

Layout (``pack``): every image is stored with its longer side first (landscape images
transposed, ``transposed`` 1), and the images are concatenated along that side into one strip
``pixels`` uint8 [R, short_max, 3]; image i is rows ``[start[i], start[i] + long_i)``, its
shorter side in columns ``[0, short_i)``. Padding is only the columns past a shorter side below
``size`` and a tail of rows so that a slice of ``length`` (the longest side) rows from any
start stays inside. A common [N, Hmax, Wmax] instead costs Hmax x Wmax per image: the longest
side squared when orientations mix, as Flowers102's do (several times the strip), and still
short x the longest side when portraits are transposed (the strip stores each image's own).

Placement: replicated, a whole copy per device (``place``: ``jax.make_array_from_callback``
with a replicated sharding; every process builds the same cache from the same split, so it
works on many hosts). Sharding the cache over the devices and gathering each step's rows
would cost interconnect traffic every step (an all-gather of the rows needed, ~0.3 MB per
image at 448 px); replication costs memory instead, the cache's bytes on every device, which
``fits`` bounds. The same replicated array serves both strategies: 'sharded' over its mesh of
all devices, 'pmap' over a mesh of the local devices (``device_pp.Augmenter``).

No TensorFlow here (numpy and jax): the decoding and shrinking is ``pipeline.cache_images``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# 'auto' puts the train split on the device when its cache takes at most this share of one
# device's memory (the rest: params, optimizer state, activations).
DEVICE_CACHE_SHARE = 0.25
# Where no memory figure can be read: no memory_stats() and no /proc/meminfo.
FALLBACK_DEVICE_BYTES = 4 << 30
ARRAYS = ('pixels', 'start', 'hw', 'orig_hw', 'transposed')


@dataclasses.dataclass(frozen=True)
class DeviceCache:
  """One split's images packed for the device (see the module docstring), host numpy.

  pixels: uint8 [R, short_max, 3], the strip of images, longer side first.
  start: int32 [N], image i's first row in ``pixels``.
  hw: int32 [N, 2], image i's (h, w) in the cache, in its original orientation.
  orig_hw: int32 [N, 2], the original's (H, W) (the random parameters' coordinates).
  transposed: int32 [N], 1 where the image is stored transposed (w > h).
  size: the shorter side the images were brought to (``data.device_cache_size``).
  method: the interpolation they were shrunk with.
  """
  pixels: np.ndarray
  start: np.ndarray
  hw: np.ndarray
  orig_hw: np.ndarray
  transposed: np.ndarray
  size: int
  method: str

  def __len__(self) -> int:
    return len(self.start)

  @property
  def length(self) -> int:
    """The longest side: the rows of the slice that holds any one image."""
    return int(self.hw.max()) if len(self) else 0

  @property
  def nbytes(self) -> int:
    """Bytes one device holds (all arrays)."""
    return sum(getattr(self, name).nbytes for name in ARRAYS)

  @property
  def image_bytes(self) -> int:
    """Bytes of the images themselves: ``nbytes`` less the padding and the index arrays."""
    return int(np.prod(self.hw, axis=1).sum()) * 3

  def arrays(self) -> dict:
    """The arrays ``device_pp.augment`` reads, by name (``ARRAYS``)."""
    return {name: getattr(self, name) for name in ARRAYS}

  def place(self, sharding: jax.sharding.Sharding) -> dict:
    """``arrays()`` as jax arrays with ``sharding`` (replicated: a copy per device). Every
    process must call it with the same cache (multi-host: each builds it from the split)."""
    def put(x):
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return {name: put(x) for name, x in self.arrays().items()}


def pack(images: list, orig_hw, size: int, method: str) -> DeviceCache:
  """Shrunk images (uint8 [h, w, 3] each) -> ``DeviceCache``.

  Args:
    images: image i of the split, shorter side at most ``size``.
    orig_hw: int [N, 2], the originals' (H, W).
  """
  hw = np.array([im.shape[:2] for im in images], np.int32).reshape(-1, 2)
  if hw.size and hw.min(axis=1).max() > size:
    raise ValueError(f'pack: an image has a shorter side above the cache size {size}.')
  transposed = (hw[:, 0] < hw[:, 1]).astype(np.int32)
  long_, short = hw.max(axis=1), hw.min(axis=1)
  start = np.concatenate([[0], np.cumsum(long_)[:-1]]).astype(np.int32)
  length = int(long_.max()) if len(images) else 0
  rows = int(start[-1]) + length if len(images) else 0
  pixels = np.zeros((rows, int(short.max()) if len(images) else 0, 3), np.uint8)
  for i, image in enumerate(images):
    block = image.transpose(1, 0, 2) if transposed[i] else image
    pixels[start[i]:start[i] + long_[i], :short[i]] = block
  return DeviceCache(pixels, start, hw, np.asarray(orig_hw, np.int32).reshape(-1, 2),
                     transposed, int(size), method)


def _host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux), None where it cannot be read."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def device_memory() -> tuple[int, str]:
  """(bytes one local device can hold, where the figure comes from).

  An accelerator: its ``memory_stats()['bytes_limit']`` (the allocator's limit). CPU devices
  (no memory_stats) share the host's memory: its available memory (``/proc/meminfo``
  MemAvailable) divided by the local device count, since each holds a copy; else
  ``FALLBACK_DEVICE_BYTES``.
  """
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.platform} memory_stats bytes_limit'
  available = _host_available_bytes()
  if available is None:
    return FALLBACK_DEVICE_BYTES, 'FALLBACK_DEVICE_BYTES (no memory figure)'
  return available // jax.local_device_count(), 'host MemAvailable / local devices'


def fits(nbytes: int, share: float = DEVICE_CACHE_SHARE) -> bool:
  """Whether a replicated cache of ``nbytes`` takes at most ``share`` of one device's memory
  (``device_memory``)."""
  return nbytes <= share * device_memory()[0]
