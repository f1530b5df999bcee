"""``build(config.data, seed)`` -> ``Dataset``: splits, class names and batch iterators."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator

import numpy as np

from flowers_jax.data import device_cache as device_cache_lib
from flowers_jax.data import pipeline
from flowers_jax.data import pp
from flowers_jax.data import samplers
from flowers_jax.data import sources
from flowers_jax.data import transforms

# Decoded images of a split are kept in memory when they take at most this much.
DECODED_CACHE_BYTES = 1 << 30
DEFAULT_INTERPOLATION = 'bilinear'  # data.interpolation='' without weights that say otherwise
ON_DEVICE = ('auto', 'host', 'device')


def _channels(value, key: str, default: tuple) -> tuple[float, float, float]:
  """``data.mean`` / ``data.std``: three numbers (a JSON list is fine); () is ``default``."""
  if value is None or (hasattr(value, '__len__') and len(value) == 0):
    return tuple(default)
  ok = (hasattr(value, '__len__') and not isinstance(value, str) and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
  if not ok or (key == 'std' and min(value) <= 0):
    what = 'three numbers > 0' if key == 'std' else 'three numbers'
    raise ValueError(f'config.data.{key}={value!r}; expected {what} (per channel, of pixels'
                     ' in [0, 1]), or () for the weights\' / ImageNet\'s.')
  return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``config.data`` checked, ``eval_resize=0`` resolved (keys: the package docstring;
  defaults: ``flowers_jax.config.base_config()``)."""
  source: str
  dir: str
  image_size: int
  pp_train: str
  pp_eval: str
  eval_resize: int
  interpolation: str
  mean: tuple
  std: tuple
  skip_corrupt: bool
  cache: bool
  threads: int
  prefetch: int
  on_device: str
  device_cache_size: int

  @classmethod
  def parse(cls, config: Any) -> 'DataConfig':
    """From a ConfigDict / dict / DataConfig with every key; ValueError (one line) if bad."""
    if isinstance(config, DataConfig):
      values = dataclasses.asdict(config)
    else:
      items = config.items() if hasattr(config, 'items') else vars(config).items()
      values = dict(items)
    fields = [f.name for f in dataclasses.fields(cls)]
    wrong = {'unknown keys': sorted(set(values) - set(fields)),
             'missing keys': [k for k in fields if k not in values]}
    if any(wrong.values()):
      found = ' and '.join(f'{what} {keys}' for what, keys in wrong.items() if keys)
      raise ValueError(f'config.data has {found}; valid keys: {fields} (start from'
                       ' flowers_jax.config.base_config().data).')
    cfg = cls(**values)
    cfg = dataclasses.replace(cfg, interpolation=cfg.interpolation or DEFAULT_INTERPOLATION,
                              mean=_channels(cfg.mean, 'mean', transforms.IMAGENET_MEAN),
                              std=_channels(cfg.std, 'std', transforms.IMAGENET_STD))
    if cfg.on_device not in ON_DEVICE:
      raise ValueError(f'Unknown config.data.on_device {cfg.on_device!r}; valid: {ON_DEVICE}.')
    if not isinstance(cfg.device_cache_size, int) or cfg.device_cache_size < 0:
      raise ValueError(f'config.data.device_cache_size={cfg.device_cache_size!r}; expected an'
                       ' integer >= 0 (0: 2 x image_size).')
    if not cfg.device_cache_size:
      cfg = dataclasses.replace(cfg, device_cache_size=2 * cfg.image_size)
    if cfg.device_cache_size < cfg.image_size:
      raise ValueError(f'config.data.device_cache_size={cfg.device_cache_size} is smaller than'
                       f' the crop image_size={cfg.image_size}.')
    if cfg.interpolation not in transforms.INTERPOLATIONS:
      raise ValueError(f'Unknown config.data.interpolation {cfg.interpolation!r}; valid:'
                       f' {transforms.INTERPOLATIONS}.')
    if cfg.source not in sources.READERS:
      raise ValueError(f'Unknown config.data.source {cfg.source!r}; valid:'
                       f' {sorted(sources.READERS)}.')
    if not cfg.eval_resize:
      cfg = dataclasses.replace(cfg, eval_resize=int(round(cfg.image_size * 256 / 224)))
    if cfg.eval_resize < cfg.image_size:
      raise ValueError(f'config.data.eval_resize={cfg.eval_resize} is smaller than the'
                       f' crop image_size={cfg.image_size}.')
    for key in pp.KEYS:
      pp.from_config(cfg, key)
    return cfg


def _header_error(split: sources.Split, i: int) -> str:
  try:
    sources.image_header(split.read(i))
  except ValueError as e:
    return str(e)
  return 'not a readable image file'


class Dataset:
  """A source's splits and their batch iterators (host-local numpy dicts)."""

  def __init__(self, source: sources.Source, cfg: DataConfig, seed: int,
               process_index: int, process_count: int):
    self.config, self.seed = cfg, seed
    self.process_index, self.process_count = process_index, process_count
    self.source = source
    self.num_classes = source.num_classes
    self.class_names = tuple(source.class_names)
    self._sizes: dict[str, np.ndarray] = {}  # decoded bytes of each image
    self._decoded: dict[str, list] = {}
    self.skipped: dict[str, int] = {}  # corrupt images skipped (skip_corrupt=True)
    for name, split in list(source.splits.items()):
      sizes, bad = sources.check_headers(split)
      if bad and not cfg.skip_corrupt:
        raise sources.corrupt_error(split, bad[0], _header_error(split, bad[0]))
      if cfg.skip_corrupt:
        good = np.setdiff1d(np.arange(len(split)), bad)
        images, undecodable = pipeline.decode_all(split.select(good), cfg.threads,
                                                  skip_errors=True)
        bad = sorted(bad + [int(good[i]) for i in undecodable])
        source.splits[name] = sources.drop_corrupt(name, split, bad)
        sizes = np.delete(sizes, bad)
        if cfg.cache and sizes.sum() <= DECODED_CACHE_BYTES:
          self._decoded[name] = [im for im in images if im is not None]
      self.skipped[name] = len(bad)
      self._sizes[name] = sizes
    self.num_examples = {name: len(split) for name, split in source.splits.items()}
    self._stores: dict[str, pipeline.ImageStore] = {}
    self._eval_cache: dict[tuple, Any] = {}
    self._device_caches: dict[str, device_cache_lib.DeviceCache] = {}

  @property
  def splits(self) -> dict[str, sources.Split]:
    return self.source.splits

  def split(self, name: str) -> sources.Split:
    if name not in self.source.splits:
      raise ValueError(f'Unknown split {name!r}; this {self.source.name} source has'
                       f' {sorted(self.source.splits)}.')
    return self.source.splits[name]

  def steps_per_epoch(self, global_batch: int) -> int:
    """Train steps per epoch (remainder dropped)."""
    return samplers.num_steps(self.num_examples['train'], global_batch)

  def _encoded_store(self, name: str) -> pipeline.ImageStore:
    split = self.split(name)
    on_disk = split.paths is not None and not self.config.cache
    return pipeline.ImageStore(split, 'files' if on_disk else 'bytes')

  def _store(self, name: str) -> pipeline.ImageStore:
    """The train store: decoded in memory when cache=True and small enough."""
    if name not in self._stores:
      split = self.split(name)
      if not self.config.cache:
        self._stores[name] = self._encoded_store(name)
      elif self._sizes[name].sum() <= DECODED_CACHE_BYTES:
        images = self._decoded.pop(name, None)
        if images is None:
          images, _ = pipeline.decode_all(split, self.config.threads)
        self._stores[name] = pipeline.ImageStore(split, 'decoded', images)
      else:
        self._stores[name] = pipeline.ImageStore(split, 'bytes')
    return self._stores[name]

  def _host_plan(self, plan: dict) -> dict:
    return samplers.host_rows(plan, self.process_index, self.process_count)

  def train_plan(self, global_batch: int, epoch: int, sampler: str = 'random',
                 pk_k: int = 4) -> dict:
    """The global plan of epoch ``epoch``: int arrays [steps, global_batch] of positions."""
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f'Unknown sampler {sampler!r}; valid: {sorted(samplers.SAMPLERS)}.')
    labels = self.split('train').labels
    samplers.num_steps(len(labels), global_batch, 'train')
    kwargs = {'k': pk_k} if sampler == 'pk' else {}
    return samplers.SAMPLERS[sampler](labels, global_batch, self.seed, epoch, **kwargs)

  def train_batches(self, global_batch: int, epoch: int, start_step: int = 0,
                    sampler: str = 'random', pk_k: int = 4) -> Iterator[dict]:
    """Host batches ``start_step..`` of epoch ``epoch`` (see the package docstring)."""
    plan = self._host_plan(self.train_plan(global_batch, epoch, sampler, pk_k))
    if not 0 <= start_step <= plan['index'].shape[0]:
      raise ValueError(f'start_step={start_step} is outside the epoch\'s'
                       f' {plan["index"].shape[0]} steps.')
    store = self._store('train')
    b = global_batch // self.process_count
    ds, plan = pipeline.train_dataset(store, plan, self.config, self.seed, epoch,
                                      global_batch, self.process_index * b, start_step)
    return pipeline.iterate(ds, store.split, plan)

  def _stream_rows(self, global_batch: int, start_step: int, sampler: str, pk_k: int):
    """(element keys, this host's rows of the stream's batches ``start_step..``, rows b)."""
    global_rows = samplers.stream(sampler, self.split('train').labels, global_batch, self.seed,
                                  start_step=start_step, k=pk_k)
    first = next(global_rows)  # its keys are the elements' (triplets add two)
    rows = lambda batch: samplers.host_rows({k: v[None] for k, v in batch.items()},
                                            self.process_index, self.process_count)
    host = ({k: v[0] for k, v in rows(batch).items()}
            for batch in itertools.chain([first], global_rows))
    return tuple(first), host, global_batch // self.process_count

  def train_stream(self, global_batch: int, start_step: int = 0, sampler: str = 'random',
                   pk_k: int = 4) -> Iterator[dict]:
    """Host batches ``start_step, start_step + 1, ...`` of the endless train stream
    (``samplers.stream``: passes over the split back to back, nothing dropped; batch ``s``
    is a pure function of ``(seed, s)``, so a resume at ``start_step=s`` is exact)."""
    keys, host, b = self._stream_rows(global_batch, start_step, sampler, pk_k)
    store = self._store('train')
    ds = pipeline.train_stream_dataset(store, host, keys, self.config, self.seed, b)
    return pipeline.iterate(ds, store.split, None)

  def device_cache(self, name: str = 'train') -> device_cache_lib.DeviceCache:
    """Split ``name`` for the device path (``device_cache``), decoded and packed once: shorter
    sides brought down to ``data.device_cache_size`` with ``data.interpolation``."""
    if name not in self._device_caches:
      split, cfg = self.split(name), self.config
      if name in self._stores:
        store = self._stores[name]
      elif name in self._decoded:  # skip_corrupt decoded it at build
        store = pipeline.ImageStore(split, 'decoded', self._decoded[name])
      else:
        store = self._encoded_store(name)
      images, orig_hw = pipeline.cache_images(store, cfg.device_cache_size, cfg.interpolation,
                                              cfg.threads)
      self._device_caches[name] = device_cache_lib.pack(images, orig_hw, cfg.device_cache_size,
                                                        cfg.interpolation)
    return self._device_caches[name]

  def device_train_stream(self, global_batch: int, start_step: int = 0,
                          sampler: str = 'random', pk_k: int = 4) -> Iterator[dict]:
    """``train_stream``'s batches without pixels, for ``device_pp.Augmenter``.

    Same rows and keys, but each image key ('image', and the triplet sampler's 'positive',
    'negative') is under ``pp.PARAMS_KEY`` as a dict: 'index' int32 [b] (its position in
    ``device_cache('train')``, built here if need be) and ``f'{k}.{name}'``, op k's random
    parameters (``pp.Pipeline.draw``: 'window' int32 [b, 4] (top, left, h, w) in the
    original's pixels, 'flip' int32 [b]) drawn exactly as ``train_stream`` draws them; plus
    'label' int32 [b], 'mask' float32 [b] (and 'negative_label'). ValueError (one line) if
    pp_train has ops without a device version (``device_pp.unsupported``).
    """
    from flowers_jax.data import device_pp  # jax: only the device path needs it
    problem = device_pp.unsupported(pp.from_config(self.config, 'pp_train'))
    if problem:
      raise ValueError(problem)
    cache = self.device_cache('train')
    keys, host, b = self._stream_rows(global_batch, start_step, sampler, pk_k)
    split = self.split('train')
    ds = pipeline.device_stream_dataset(cache.orig_hw, split.labels, host, keys, self.config,
                                        self.seed, b)
    return pipeline.iterate(ds, split, None)

  def eval_batches(self, split: str, global_batch: int) -> Iterator[dict]:
    """All examples of ``split`` once, in order; the last batch padded with mask 0."""
    n = len(self.split(split))
    plan = self._host_plan(samplers.eval_plan(n, global_batch))
    key = (split, global_batch)
    if key not in self._eval_cache:
      small = n * self.config.image_size ** 2 * 3 <= DECODED_CACHE_BYTES
      # Eval caches its final crops; full-size images only when they are at hand.
      decoded = split in self._stores or split in self._decoded
      store = self._store(split) if decoded else self._encoded_store(split)
      self._eval_cache[key] = pipeline.eval_dataset(store, plan, self.config,
                                                    cache=self.config.cache and small)
    return pipeline.iterate(self._eval_cache[key], self.split(split), plan)


def build(config: Any, seed: int = 0, process_index: int | None = None,
          process_count: int | None = None) -> Dataset:
  """Reads ``config.data``'s source and returns a ``Dataset``.

  Args:
    config: ``config.data`` (ConfigDict, dict or DataConfig).
    seed: fixes every epoch's order and augmentation.
    process_index / process_count: this host and the number of hosts; None means
      ``jax.process_index()`` / ``jax.process_count()``.
  """
  cfg = DataConfig.parse(config)
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  return Dataset(sources.read(cfg.source, cfg.dir), cfg, seed, process_index, process_count)
