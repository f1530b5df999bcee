"""tf.data assembly: index plans in, host-local numpy batches out.

The plan (``samplers``) fixes which split position fills each row; tf.data only
loads, augments, batches and prefetches, in order (``deterministic=True``).
Every random choice of an example is a stateless function of
``example_seed = fold_in(fold_in([seed, pass], position), part)``, ``position`` its
place in the pass's global order (``step * G + row`` for epoch plans; the epoch is the
pass) and ``part`` 0, 1, 2 for a
triplet's anchor, positive and negative, so any step can be recomputed alone. The
images go through ``config.data.pp_train`` / ``pp_eval`` (``pp``: ops on uint8
[H, W, 3], random ones seeded from ``example_seed``); batches stay uint8, normalised
on the device by the steps (``flowers_jax.normalization``: ``data.mean`` / ``data.std``).

``ImageStore`` holds one split's images in one of three forms: ``files`` (read on
every use), ``bytes`` (encoded, in memory) or ``decoded`` (uint8 arrays in memory,
served with ``tf.numpy_function``). JPEGs are decoded like PIL (``INTEGER_ACCURATE``
IDCT), always whole, so every store gives the same pixels.

The device path (``device_pp``): ``cache_images`` decodes a split once and shrinks it for
``device_cache.pack``; ``device_stream_dataset`` is the train stream's twin that decodes
nothing: per image key, its cache position and its random parameters (``pp.Pipeline.draw``
on the original's shape, from the same ``example_seed``).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from flowers_jax.data import pp
from flowers_jax.data import sources
from flowers_jax.data import tf_import
from flowers_jax.data import transforms

AUTOTUNE = -1


def import_tf():
  """TensorFlow for the input pipeline (`tf_import.py`: GPUs hidden, no import banners)."""
  return tf_import.import_tf()


def graph_fn(fn):
  """`fn` for `Dataset.map`, traced as it is: its control flow is already TensorFlow's
  (`tf.cond`), so autograph has nothing to convert, and not converting writes none of the
  `__autograph_generated_file*.py` files it leaves in the temp directory of a process that
  ends without running atexit (test workers, killed runs)."""
  return import_tf().autograph.experimental.do_not_convert(fn)


def _decode_full(data):
  """Encoded image (tf.string scalar) -> uint8 [H, W, 3]."""
  tf = import_tf()
  image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  return tf.ensure_shape(image, [None, None, 3])


class ImageStore:
  """One split's images, addressable by position inside tf.data functions."""

  def __init__(self, split: sources.Split, mode: str, images: list | None = None):
    tf = import_tf()
    self.split, self.mode = split, mode
    if mode == 'files':
      self._data = tf.constant(split.paths, tf.string)
    elif mode == 'bytes':
      self._data = tf.constant([split.read(i) for i in range(len(split))], tf.string)
    elif mode == 'decoded':
      self._images = images
    else:
      raise ValueError(f'Unknown store mode {mode!r}')

  def encoded(self, i):
    tf = import_tf()
    data = tf.gather(self._data, i)
    return tf.io.read_file(data) if self.mode == 'files' else data

  def full(self, i):
    """Image at position ``i`` (int64 scalar tensor): uint8 [H, W, 3].

    Always the whole image: ``decode_and_crop_jpeg`` would be faster for crops but
    its chroma upsampling differs at the window's edges from a full decode.
    """
    tf = import_tf()
    if self.mode == 'decoded':
      image = tf.numpy_function(lambda j: self._images[j], [i], tf.uint8, stateful=False)
      return tf.ensure_shape(image, [None, None, 3])
    return _decode_full(self.encoded(i))


def find_corrupt(split: sources.Split, positions) -> tuple[int, str] | None:
  """The first position among ``positions`` whose image TensorFlow cannot decode."""
  tf = import_tf()
  for i in dict.fromkeys(int(p) for p in np.ravel(positions)):
    try:
      sources.image_header(split.read(i))
      _decode_full(tf.constant(split.read(i))).numpy()
    except (ValueError, tf.errors.OpError) as e:
      return i, str(e).strip().splitlines()[0]
  return None


def decode_all(split: sources.Split, threads: int, skip_errors: bool = False):
  """Decodes every image once: (list of uint8 [H, W, 3] or None, corrupt positions)."""
  tf = import_tf()
  store = ImageStore(split, 'files' if split.paths is not None else 'bytes')
  ds = tf.data.Dataset.range(len(split)).map(
      graph_fn(lambda i: (i, store.full(i))), num_parallel_calls=threads or AUTOTUNE,
      deterministic=True)
  if skip_errors:
    ds = ds.ignore_errors()
  images = _collect(ds, split)
  return images, [i for i, im in enumerate(images) if im is None]


def _collect(ds, split: sources.Split) -> list:
  """A tf.data of (i, x) or (i, x, y, ...) elements -> [x or (x, y, ...) at i] (None where
  an element is missing); a decode error names the corrupt file."""
  tf = import_tf()
  out = [None] * len(split)
  try:
    for i, *rest in ds.as_numpy_iterator():
      out[i] = rest[0] if len(rest) == 1 else tuple(rest)
  except tf.errors.OpError as e:
    found = find_corrupt(split, [i for i, x in enumerate(out) if x is None])
    if found is None:
      raise
    raise sources.corrupt_error(split, *found) from e
  return out


def cache_images(store: ImageStore, size: int, method: str, threads: int):
  """Every image of ``store`` decoded once, its shorter side brought down to ``size``
  (``transforms.resize_shorter``, antialiased ``method``; never enlarged): (list of uint8
  [h, w, 3], int32 [N, 2] of the originals' (H, W)), for ``device_cache.pack``."""
  tf = import_tf()

  def shrink(i):
    image = store.full(i)
    shape = tf.shape(image)[:2]
    small = tf.cond(tf.reduce_min(shape) > size,
                    lambda: transforms.resize_shorter(image, size, method), lambda: image)
    return i, shape, small

  ds = tf.data.Dataset.range(len(store.split)).map(
      graph_fn(shrink), num_parallel_calls=threads or AUTOTUNE, deterministic=True)
  pairs = _collect(ds, store.split)
  return [p[1] for p in pairs], np.array([p[0] for p in pairs], np.int32).reshape(-1, 2)


# ---------------------------------------------------------------- per-example maps


def example_seed(base, position, part: int = 0):
  """Stateless seed of one image: fold_in(fold_in(base, position), part)."""
  tf = import_tf()
  fold = tf.random.experimental.stateless_fold_in
  return fold(fold(base, position), part)


TRIPLET_PARTS = {'image': 'index', 'positive': 'positive', 'negative': 'negative'}


def _options(threads: int):
  tf = import_tf()
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def _train_example(store: ImageStore, cfg, seed: int, parts: dict):
  """The map of one train element (positions, ``pass``, ``position``) to its example."""
  tf = import_tf()
  labels = store.split.labels
  augment = pp.from_config(cfg, 'pp_train')

  def load(ex):
    base = tf.stack([tf.constant(seed, tf.int64), ex['pass']])
    out = {'label': tf.gather(labels, ex['index']),
           'mask': tf.constant(1.0, tf.float32)}
    for part, (key, src) in enumerate(parts.items()):
      seed_i = example_seed(base, ex['position'], part)
      out[key] = augment(store.full(ex[src]), seed_i)  # uint8: normalised on the device
    if 'negative' in ex:
      out['negative_label'] = tf.gather(labels, ex['negative'])
    return out

  return graph_fn(load)


def _parts(keys) -> dict:
  return {k: v for k, v in TRIPLET_PARTS.items() if v in keys}


def train_dataset(store: ImageStore, host_plan: dict, cfg, seed: int, epoch: int,
                  global_batch: int, row_offset: int, start_step: int):
  """tf.data of host batches for steps ``start_step..`` of ``host_plan``.

  Args:
    host_plan: int [steps, b] arrays (``index`` [+ ``positive``, ``negative``]).
    row_offset: this host's first row in the global batch (process_index * b).
  """
  tf = import_tf()
  plan = {k: v[start_step:] for k, v in host_plan.items()}
  steps, b = plan['index'].shape
  rows = (np.arange(start_step, start_step + steps)[:, None] * global_batch
          + row_offset + np.arange(b)[None, :])
  elements = {k: v.reshape(-1).astype(np.int64) for k, v in plan.items()}
  elements['position'] = rows.reshape(-1).astype(np.int64)
  elements['pass'] = np.full_like(elements['position'], epoch)
  threads = cfg.threads or AUTOTUNE
  ds = tf.data.Dataset.from_tensor_slices(elements)
  ds = ds.map(_train_example(store, cfg, seed, _parts(elements)), num_parallel_calls=threads,
              deterministic=True)
  ds = ds.batch(b, drop_remainder=True).prefetch(cfg.prefetch or AUTOTUNE)
  return ds.with_options(_options(cfg.threads)), plan


def _device_example(orig_hw, labels, cfg, seed: int, parts: dict):
  """``_train_example``'s twin for the device path: no pixels; per image key its cache
  position 'index' int32 and the random ops' parameters (``pp.Pipeline.draw`` for the
  original's shape, from the same example seed), under ``pp.PARAMS_KEY``."""
  tf = import_tf()
  augment = pp.from_config(cfg, 'pp_train')
  shapes = tf.constant(np.asarray(orig_hw, np.int32).reshape(-1, 2))

  def load(ex):
    base = tf.stack([tf.constant(seed, tf.int64), ex['pass']])
    out = {'label': tf.gather(labels, ex['index']),
           'mask': tf.constant(1.0, tf.float32)}
    params = {}
    for part, (key, src) in enumerate(parts.items()):
      seed_i = example_seed(base, ex['position'], part)
      params[key] = {'index': tf.cast(ex[src], tf.int32),
                     **augment.draw(tf.gather(shapes, ex[src]), seed_i)}
    out[pp.PARAMS_KEY] = params
    if 'negative' in ex:
      out['negative_label'] = tf.gather(labels, ex['negative'])
    return out

  return graph_fn(load)


def _stream(host_batches, keys, example, cfg, b: int):
  """tf.data of ``example`` mapped over the rows of ``host_batches``, batched by ``b``."""
  tf = import_tf()
  spec = {k: tf.TensorSpec([b], tf.int64) for k in keys}
  ds = tf.data.Dataset.from_generator(lambda: host_batches, output_signature=spec)
  ds = ds.unbatch().map(example, num_parallel_calls=cfg.threads or AUTOTUNE, deterministic=True)
  ds = ds.batch(b, drop_remainder=True).prefetch(cfg.prefetch or AUTOTUNE)
  return ds.with_options(_options(cfg.threads))


def train_stream_dataset(store: ImageStore, host_batches, keys, cfg, seed: int, b: int):
  """tf.data of the endless train stream: ``host_batches`` yields this host's rows of each
  global batch (``samplers.stream`` cut by ``host_rows``: int64 arrays [b] under ``keys``).
  One iterator for the whole run: no rebuild and no cold batch at a pass boundary."""
  return _stream(host_batches, keys, _train_example(store, cfg, seed, _parts(keys)), cfg, b)


def device_stream_dataset(orig_hw, labels, host_batches, keys, cfg, seed: int, b: int):
  """``train_stream_dataset``'s rows for the device path (``_device_example``): ``orig_hw``
  int [N, 2] the train images' original (H, W), ``labels`` int [N]."""
  return _stream(host_batches, keys, _device_example(orig_hw, labels, cfg, seed, _parts(keys)),
                 cfg, b)


def eval_dataset(store: ImageStore, host_plan: dict, cfg, cache: bool):
  """tf.data of padded host eval batches (image, label, mask, id)."""
  tf = import_tf()
  b = host_plan['index'].shape[1]
  index = host_plan['index'].reshape(-1).astype(np.int64)
  split = store.split
  view = pp.from_config(cfg, 'pp_eval')
  ds = tf.data.Dataset.from_tensor_slices(index).map(
      graph_fn(lambda i: view(store.full(i))), num_parallel_calls=cfg.threads or AUTOTUNE,
      deterministic=True)
  if cache:
    ds = ds.cache()
  meta = tf.data.Dataset.from_tensor_slices({
      'label': split.labels[index].astype(np.int32),
      'mask': host_plan['mask'].reshape(-1).astype(np.float32),
      'id': split.ids[index].astype(np.int32)})
  ds = tf.data.Dataset.zip(ds, meta).map(graph_fn(lambda im, m: dict(m, image=im)))
  ds = ds.batch(b, drop_remainder=True).prefetch(cfg.prefetch or AUTOTUNE)
  return ds.with_options(_options(cfg.threads))


def iterate(ds, split: sources.Split, plan: dict | None) -> Iterator[dict]:
  """Yields numpy batches; a decode error names the corrupt file of its step (of any
  position of the split when there is no plan: the endless stream)."""
  tf = import_tf()
  it = ds.as_numpy_iterator()
  step = 0
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      if plan is None:
        found = find_corrupt(split, np.arange(len(split)))
      else:
        window = [v[step:step + 2] for v in plan.values() if v.dtype.kind == 'i']
        found = find_corrupt(split, np.concatenate([w.ravel() for w in window]))
      if found is None:
        logging.error('Input pipeline failed at step %d and no single corrupt image of'
                      ' that step was found.', step)
        raise
      raise sources.corrupt_error(split, *found) from e
    step += 1
    yield batch
