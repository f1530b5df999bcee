"""Train augmentation on the accelerators: the pp ops on images held there (``device_cache``).

  cache = ds.device_cache('train')                              # host numpy, built once
  augmenter = device_pp.Augmenter(cache, pp.from_config(cfg, 'pp_train'), strategy)
  for host in ds.device_train_stream(global_batch, start_step):   # parameters, no pixels
    batch = augmenter(strategy.put_batch(host))   # + 'image' (+ 'positive', 'negative') uint8
    state, metrics = train_step(state, batch)

  device_pp.unsupported(pipe)   # None, or one line naming the ops without a device version

Who does what. The host draws every random parameter exactly as the host path does
(``pp.Pipeline.draw``, in a tf.data map that decodes nothing): from the same example seed
(``pipeline.example_seed``), split among the random ops the same way, with the functions of
the seed the ops themselves use (random_resized_crop's window in the original image's pixels,
flip_lr's coin). Its batches carry, per image key, the cache position and those parameters
(under ``pp.PARAMS_KEY``); the device applies them to the cached image (``augment``).

Geometry (``View``): the ops are followed as a map, per axis, from the pixels of the image the
host pipeline holds after each op to the cache's coordinates (``a + b * (i + 0.5)`` for pixel
i), with the interval [lo, hi] of the cache that holds its content. Crops, zero padding and
flips move the map; a resize (random_resized_crop, resize, resize_small) rescales it and
narrows the content to the image it resizes (the host resizes a crop alone: its kernel sees
nothing outside the crop). One resample at the end (``_render``) reads the output off the
cache: per axis a weight matrix [S, length] over the cache pixels whose centre is in the
content; 'bilinear' / 'bicubic' are the antialiased filters of ``tf.image.resize(antialias=
True)`` and ``jax.image.scale_and_translate(antialias=True)`` (triangle / Keys a=-0.5, widened
by the pixel ratio when shrinking), 'area' and 'nearest' TF's ``resize_area`` /
``resize_nearest_neighbor``; weights normalised, zero where the output pixel's centre is outside
the content (padding); the result rounded and clipped to uint8 levels as the host path does.
The weights are computed here rather than by ``scale_and_translate`` because the kernel must
stop at each example's own window inside the cache.

Approximations, against the host path on the original image:
- the cache: an image shrunk to shorter side ``device_cache_size`` is resampled twice (into the
  cache, then out of it), and its parameters are mapped from the original's pixels to the
  cache's by the per-axis size ratio. An image that is not shrunk (shorter side at most the
  cache size) differs only by the kernel's arithmetic: float32 in another order, at most 2 grey
  levels, ~0.1 on average (tests/test_device_pp.py).
- several resizes in one spec (e.g. 'resize_small|random_resized_crop') are composed into the
  one resample with the last resize's method; the host resamples at each. Zero padding that a
  later resize would blend in (a center_crop larger than the image, then a resize) is left out
  of that resize's kernel. The presets all have one resize.

Layouts (``Augmenter``, ``LAYOUTS``): 'sharded' batches are global arrays sharded ``P('data')``
over the strategy's mesh and the cache is replicated on that mesh; 'pmap' batches are
[n_local, b / n_local, ...] with the leading axis over the local devices and the cache
replicated on a mesh of those. ``shard_map`` runs each device's rows against its own copy of
the cache (no communication), and the images come out laid out as the rows came in, which is
what the strategy's compiled step takes. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowers_jax import parallel
from flowers_jax.data import pp
from flowers_jax.data.device_cache import DeviceCache

PARAMS_KEY = pp.PARAMS_KEY
# Images resampled together (lax.map batches of exactly CHUNK rows): bounds the float32 slices'
# memory, and every row is computed by the same program whatever the batch or device count.
CHUNK = 16
_F32 = jnp.float32
_TINY = 1000 * float(np.finfo(np.float32).eps)  # a smaller total weight is no weight (TF, jax)


class View(NamedTuple):
  """The host pipeline's current image, seen from the cache; each field is per axis [2] (y, x).

  Its pixel i is centred at cache coordinate ``a + b * (i + 0.5)`` (``b`` < 0: flipped); ``size``
  is its size in pixels; [lo, hi] the cache coordinates of its content (outside: zeros).
  """
  a: jax.Array  # float32 [2]
  b: jax.Array  # float32 [2]
  size: jax.Array  # int32 [2]
  lo: jax.Array  # float32 [2]
  hi: jax.Array  # float32 [2]


def _original(hw, orig_hw) -> View:
  """The original image (H, W) = ``orig_hw``, cached as (h, w) = ``hw``."""
  hw = hw.astype(_F32)
  return View(jnp.zeros(2, _F32), hw / orig_hw.astype(_F32), orig_hw, jnp.zeros(2, _F32), hw)


def _crop(v: View, start, size) -> View:
  """Pixels ``[start, start + size)`` (int32 [2] each)."""
  return v._replace(a=v.a + v.b * start, size=jnp.asarray(size, jnp.int32))


def _pad(v: View, before, total) -> View:
  """``total`` zero pixels added, ``before`` of them first (int32 [2] each)."""
  return v._replace(a=v.a - v.b * before, size=v.size + total)


def _flip(v: View, axes) -> View:
  """Reversed along the axes where ``axes`` (bool [2]) holds."""
  return v._replace(a=jnp.where(axes, v.a + v.b * v.size, v.a), b=jnp.where(axes, -v.b, v.b))


def _resize(v: View, size) -> View:
  """Resampled to ``size`` (int32 [2]) pixels: the content narrows to this image."""
  ends = v.a, v.a + v.b * v.size
  lo, hi = jnp.maximum(v.lo, jnp.minimum(*ends)), jnp.minimum(v.hi, jnp.maximum(*ends))
  size = jnp.asarray(size, jnp.int32)
  return View(v.a, v.b * v.size / size, size, lo, hi)


# ---------------------------------------------------------------- the ops: View -> View
# fn(view, params, args...): params are the op's drawn parameters (``pp.Op.draw``) of one
# example, args the pp op's own arguments.


def _random_resized_crop(v, params, size, method, scale, ratio):
  del method, scale, ratio  # the method is the render's; scale, ratio made the window
  window = params['window']  # (top, left, h, w) in the input's pixels
  return _resize(_crop(v, window[:2], window[2:]), jnp.full(2, size))


def _flip_lr(v, params):
  return _flip(v, jnp.array([False, True]) & (params['flip'] != 0))


def _resize_op(v, params, size, method):
  del params, method
  return _resize(v, jnp.full(2, size))


def _resize_small(v, params, size, method):
  """torchvision ``Resize(size)``: the long side ``floor(size * long / short)``."""
  del params, method
  short, long_ = v.size.min(), v.size.max()
  new_long = size * long_ // short
  return _resize(v, jnp.where(v.size[0] <= v.size[1], jnp.stack([size, new_long]),
                              jnp.stack([new_long, size])))


def _center_crop(v, params, size):
  """torchvision ``CenterCrop``: zero-pad to ``size`` (odd pixel last), crop at
  ``round((n - size) / 2)`` (half to even)."""
  del params
  pad = jnp.maximum(size - v.size, 0)
  v = _pad(v, pad // 2, pad)
  return _crop(v, jnp.round((v.size - size) / 2).astype(jnp.int32), jnp.full(2, size))


# pp op name -> its device version. An op missing here (randaugment, random_erasing,
# random_crop, ...) runs on the host only (``unsupported``).
OPS = {
    'random_resized_crop': _random_resized_crop,
    'flip_lr': _flip_lr,
    'resize': _resize_op,
    'resize_small': _resize_small,
    'center_crop': _center_crop,
}


def unsupported(pipe: pp.Pipeline) -> str | None:
  """None when every op of ``pipe`` has a device version (``OPS``, and a random op its
  host-side draw ``pp.Op.draw``); else one line naming the ops that do not."""
  names = [op.fn.__name__ for op, _ in pipe.ops
           if op.fn.__name__ not in OPS or (op.random and op.draw is None)]
  if not names:
    return None
  return (f'pp_train={pipe.spec!r} has ops without a device version: {list(dict.fromkeys(names))}'
          f' (device ops: {sorted(OPS)}); use data.on_device=\'host\'.')


# ---------------------------------------------------------------- resampling


def _filter(kernel):
  """An antialiased filter: the kernel widened by the pixel ratio |b| when shrinking."""
  def weights(s, q, b, lo, hi):
    del lo, hi
    return kernel(jnp.abs(q - s) / jnp.maximum(jnp.abs(b), 1.0))
  return weights


def _triangle(x):
  return jnp.maximum(0.0, 1.0 - x)


def _keys_cubic(x):
  """Keys' cubic, a = -0.5 (PIL, TF and jax with antialiasing)."""
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _area(s, q, b, lo, hi):
  """Overlap of the output pixel's box (width |b|) with each cache pixel (TF resize_area)."""
  del lo, hi
  half = jnp.abs(b) / 2
  return jnp.maximum(0.0, jnp.minimum(s + half, q + 0.5) - jnp.maximum(s - half, q - 0.5))


def _nearest(s, q, b, lo, hi):
  """The pixel under the centre, ``floor(s)``, clamped into the content (TF, half-pixel)."""
  del b
  index = jnp.clip(jnp.floor(s), jnp.ceil(lo - 0.5), jnp.floor(hi - 0.5))
  return (index + 0.5 == q).astype(_F32)


# data.interpolation -> fn(s [S, 1] output centres, q [1, L] pixel centres, b, lo, hi) -> [S, L]
WEIGHTS = {
    'bilinear': _filter(_triangle),
    'bicubic': _filter(_keys_cubic),
    'area': _area,
    'nearest': _nearest,
}


@dataclasses.dataclass(frozen=True)
class Spec:
  """``augment``'s static half (hashable): the ops with their arguments, the output side, the
  resampling method (the last resize's, else the cache's) and the cache's slice length."""
  ops: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
  size: int
  method: str
  length: int

  @classmethod
  def make(cls, pipe: pp.Pipeline, cache: DeviceCache) -> 'Spec':
    """ValueError (``unsupported``'s line) when an op of ``pipe`` has no device version."""
    problem = unsupported(pipe)
    if problem:
      raise ValueError(problem)
    ops = tuple((op.fn.__name__, tuple(sorted(kwargs.items()))) for op, kwargs in pipe.ops)
    methods = [kwargs['method'] for _, kwargs in pipe.ops if 'method' in kwargs]
    return cls(ops, pipe.output_shape()[0], (methods or [cache.method])[-1], cache.length)


def _weights(v: View, axis: int, spec: Spec):
  """float32 [S, length]: output pixel o's weight on cache pixel q along ``axis``."""
  a, b, lo, hi = v.a[axis], v.b[axis], v.lo[axis], v.hi[axis]
  s = (a + b * (jnp.arange(spec.size, dtype=_F32) + 0.5))[:, None]  # output centres
  q = (jnp.arange(spec.length, dtype=_F32) + 0.5)[None, :]  # cache pixel centres
  w = jnp.where((q >= lo) & (q <= hi), WEIGHTS[spec.method](s, q, b, lo, hi), 0.0)
  total = w.sum(axis=1, keepdims=True)
  w = jnp.where(total > _TINY, w / jnp.where(total > 0, total, 1.0), 0.0)
  return jnp.where((s >= lo) & (s <= hi), w, 0.0)


def _render(arrays: dict, i, v: View, spec: Spec):
  """Cached image ``i`` seen through ``v``: uint8 [S, S, 3]."""
  pixels = arrays['pixels']
  short = pixels.shape[1]
  image = jax.lax.dynamic_slice(pixels, (arrays['start'][i], 0, 0), (spec.length, short, 3))
  w_y, w_x = _weights(v, 0, spec), _weights(v, 1, spec)
  t = arrays['transposed'][i] != 0  # stored [W, H]: the long axis first
  w_long, w_short = jnp.where(t, w_x, w_y), jnp.where(t, w_y, w_x)[:, :short]
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum('ar,rcz->acz', w_long, image.astype(_F32), precision=highest)
  x = jnp.einsum('acz,bc->abz', x, w_short, precision=highest)
  x = jnp.where(t, x.transpose(1, 0, 2), x)
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def _one(arrays: dict, params: dict, spec: Spec):
  """One example: params {'index': int32 scalar, f'{k}.{name}': op k's parameter}."""
  i = params['index']
  v = _original(arrays['hw'][i], arrays['orig_hw'][i])
  for k, (name, kwargs) in enumerate(spec.ops):
    mine = {key.split('.', 1)[1]: x for key, x in params.items() if key.startswith(f'{k}.')}
    v = OPS[name](v, mine, **dict(kwargs))
  return _render(arrays, i, v, spec)


def _rows(arrays: dict, params: dict, spec: Spec):
  """Rows {name: [n, ...]} -> uint8 [n, S, S, 3], in chunks of CHUNK rows (the last row
  repeated to fill the last chunk): a row's pixels do not depend on n, so a batch split over
  any number of devices gives the pixels one device gives (matmuls of other shapes add in
  other orders, and a level can flip at a rounding boundary)."""
  n = params['index'].shape[0]
  fill = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], -n % CHUNK, axis=0)])
  one = functools.partial(_one, arrays, spec=spec)
  return jax.lax.map(one, jax.tree.map(fill, params), batch_size=CHUNK)[:n]


@functools.partial(jax.jit, static_argnames='spec')
def augment(arrays: dict, params: dict, spec: Spec) -> jax.Array:
  """The device half of the augmentation: uint8 [B, S, S, 3].

  Args:
    arrays: ``DeviceCache.arrays()`` (numpy) or ``DeviceCache.place(...)`` (on the devices).
    params: one image key's parameters from ``Dataset.device_train_stream``
      (``batch[PARAMS_KEY]['image']``): 'index' int32 [B] (cache positions) and the random
      ops' parameters ``f'{k}.{name}'`` [B, ...] (``pp.Pipeline.draw``).
    spec: ``Spec.make(pipe, cache)``.
  """
  return _rows(arrays, params, spec)


def _block(arrays: dict, params: dict, spec: Spec) -> dict:
  """One device's rows {key: {name: [*rows, ...]}} -> {key: uint8 [*rows, S, S, 3]}, where
  ``rows`` is the shape of 'index' ([b] for 'sharded', [1, b] for 'pmap')."""
  def images(p):
    rows = p['index'].shape
    flat = {name: x.reshape(-1, *x.shape[len(rows):]) for name, x in p.items()}
    return _rows(arrays, flat, spec).reshape(*rows, spec.size, spec.size, 3)
  return {key: images(p) for key, p in params.items()}


def _sharded_layout(strategy: parallel.Sharded) -> tuple[Mesh, P]:
  return strategy.mesh, strategy.data_sharding.spec


def _pmap_layout(strategy: parallel.Pmap) -> tuple[Mesh, P]:
  # What Pmap.put_batch places: the leading axis over the local devices, one slice each.
  return Mesh(np.asarray(strategy.devices), ('devices',)), P('devices')


# strategy class -> (mesh the cache is replicated on, PartitionSpec of the batch's rows)
LAYOUTS = {parallel.Sharded: _sharded_layout, parallel.Pmap: _pmap_layout}


class Augmenter:
  """The device half for a strategy's batches: ``augmenter(strategy.put_batch(host))``.

  ``__call__(batch)``: ``PARAMS_KEY`` replaced by 'image' (+ 'positive', 'negative') uint8
  [*rows, S, S, 3] laid out as the batch's rows ('sharded': [B, S, S, 3] sharded like
  ``put_batch``'s; 'pmap': [n_local, b / n_local, S, S, 3]); the other keys pass unchanged.
  The cache is placed at construction, one copy per device (``DeviceCache.place``).
  """

  def __init__(self, cache: DeviceCache, pipe: pp.Pipeline, strategy):
    if type(strategy) not in LAYOUTS:
      raise ValueError(f'device_pp.Augmenter: no layout for {type(strategy).__name__};'
                       f' valid: {[c.__name__ for c in LAYOUTS]}')
    mesh, rows = LAYOUTS[type(strategy)](strategy)
    self.spec = Spec.make(pipe, cache)
    self.arrays = cache.place(NamedSharding(mesh, P()))
    block = functools.partial(_block, spec=self.spec)
    self._fn = jax.jit(jax.shard_map(block, mesh=mesh, in_specs=(P(), rows), out_specs=rows))

  def __call__(self, batch: dict) -> dict:
    out = dict(batch)
    out.update(self._fn(self.arrays, out.pop(PARAMS_KEY)))
    return out
