"""The training loop: data -> model -> optimizer -> steps of training, validated on a cadence
-> test of the best (or final) state.

`train_and_evaluate(config, workdir)` is all that `main.py` calls. It reads top-down: `_build`
(data, model, optimizer, compiled steps), `_resume` (the loop's state from the `latest`
checkpoint), `_train` (the steps, with `_validate` and `_save_latest` on their cadence), and
`_finish` (test, results.json). A run is `train.steps` optimizer steps, or `train.epochs` x
(train images // batch) of them; the input is one stream over the whole run. Validation every
`evals.every_steps` (0: every epoch's worth of steps) and after the last step; `latest` every
`train.checkpoint_every_steps` (0: with each validation), written asynchronously. It writes
into `workdir`:

  config.json     the resolved config
  class_names.json  the data set's class names (a JSON list; predict.py reads it)
  metrics.jsonl   one strict-JSON object per validation: step, images_seen, epoch (steps /
                  steps per epoch), train_loss, train_accuracy (since the previous row),
                  val_<scalar> of every evaluator (`evaluators.py`: val_accuracy, val_loss,
                  val_top5, val_examples; with 'embedding' val_knn_accuracy, val_recall_at_1,
                  val_recall_at_5; with EMA also val_ema_<scalar>), lr (the rate of the last
                  step), wall_time_s (since the run began), images_per_s (train steps only,
                  since the previous row), input_wait_s (blocked waiting for batches and
                  their transfer to the device, since the previous row), host_overhead_s
                  (train time the host spent on its own work: Python, dispatch, metric
                  bookkeeping; not waiting for the device or the input; since the previous
                  row)
  checkpoints/    orbax: `best` (by val accuracy, its meta the one record of the best step)
                  written before `latest` (on the cadence, and on SIGTERM/Ctrl-C)
  curves.png      train / validation accuracy against steps
  confusion_test.npy / .png, per_class_accuracy_test.npy   test arrays of the evaluators
  results.json    best_step, best_epoch, best_val_accuracy, test_<scalar> of every evaluator
                  (test_ema_<scalar> with EMA) and test_per_class_accuracy of the tested state
                  (`train.test_checkpoint`), steps / epochs / images_seen / validations, where
                  the wall time went (`train_time_s`: train steps, `eval_time_s`,
                  `checkpoint_wait_s`: the loop blocked by saves, `input_wait_s`: blocked
                  waiting for a batch, `compile_time_s`; `wall_time_s` all of it; inside
                  train_time: `device_wait_s` (blocked reading a step's metrics) and
                  `host_overhead_s`, the rest), train
                  images/s (train steps only) and, on GPU/TPU, the model-FLOPs utilisation
                  (`train_mfu`, `flops.py`), parameter counts
  tensorboard events (clu metric writers)

A run holds its workdir (`workdir_lock.py`): a second run on it stops at once with one line.
A run started again on the same workdir resumes from `latest`: the same parameters, optimizer
state, rng and position in the data, so the result equals an uninterrupted run. Every decision
that processes of a multi-host run must take together (stop, non-finite) is read from the
train step's globally reduced metrics, so every process takes it at the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowers_jax import checkpoint as ckpt_lib
from flowers_jax import config_checks, evaluators, losses, models, normalization, optim
from flowers_jax import parallel, steps
from flowers_jax.steps import TrainState
from flowers_jax.workdir_lock import WorkdirLock

RUN_SPLITS = ('train', 'validation', 'test')  # trained on, best epoch chosen on, tested on
MODEL_KEYS = ('name', 'num_classes')  # every other key of config.model is a model option
DTYPES = {name: jnp.dtype(name) for name in config_checks.DTYPES}  # train.dtype -> compute
# Config keys whose change makes a checkpoint mean something else: resuming with them refused.
STATE_DEFINING_KEYS = ('model.', 'train.loss', 'train.accum_steps', 'train.ema_decay')
CLASS_NAMES_FILE = 'class_names.json'  # the data set's class names, for predict.py
# Keys that differ between the processes of one run, or that naming alone changes.
NOT_COMPARED_KEYS = ('distributed.', 'variant')


class NonFiniteLossError(RuntimeError):
  """A non-finite loss, parameter or validation loss: the run stops, nothing is saved."""


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def model_options(model_cfg: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in model_cfg.items() if k not in MODEL_KEYS}


def create_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None):
  if config.train.dtype not in DTYPES:
    raise ValueError(f'train.dtype={config.train.dtype!r}; valid: {", ".join(DTYPES)}')
  return models.create(config.model.name, num_classes=config.model.num_classes,
                       bn_axis_name=bn_axis_name, dtype=DTYPES[config.train.dtype],
                       **model_options(config.model))


def batchnorm_uses_batch_stats(train_cfg: ml_collections.ConfigDict) -> bool:
  """`train.batchnorm`: 'batch' -> True, 'running' -> False, 'auto' -> running (False) only
  for `train.freeze='backbone'` (every BatchNorm layer is then frozen), batch otherwise."""
  mode = train_cfg.batchnorm
  if mode == 'auto':
    mode = 'running' if str(train_cfg.freeze).strip() == 'backbone' else 'batch'
  if mode not in ('batch', 'running'):
    raise ValueError(f"train.batchnorm={train_cfg.batchnorm!r}; valid: auto | batch | running")
  return mode == 'batch'


def weights_spec(init_cfg: ml_collections.ConfigDict) -> str:
  """`init.weights`, or its shorthand `init.torchvision` as 'torchvision:PATH'; '' for none."""
  if init_cfg.torchvision:
    return f'torchvision:{init_cfg.torchvision}'
  return init_cfg.weights


# data keys the weights' preprocessing fills when the config leaves them at their "auto" value
_AUTO_DATA = {'mean': (), 'std': (), 'interpolation': '', 'eval_resize': 0}


def resolve_preprocessing(config: ml_collections.ConfigDict) -> str | None:
  """Fills `data.mean`, `data.std`, `data.interpolation` and `data.eval_resize` where the
  config leaves them at their auto value ((), (), '', 0): from the weights' own preprocessing
  (a timm `pretrained_cfg`: `weights.preprocessing`), else mean / std / interpolation from
  the data config's defaults (ImageNet's, bilinear: what `data.DataConfig.parse` fills;
  eval_resize stays 0: 256/224 of the crop). Values the config sets explicitly win. The
  filled config is what config.json records, so predict and export follow it. Returns what
  the weights set, as a sentence."""
  from flowers_jax.data import dataset  # no TensorFlow: the data config's defaults
  d = config.data
  spec = weights_spec(config.init)
  pre = None
  if spec:
    from flowers_jax import weights  # a config.json, or timm's registry; a Hub NAME downloaded
    pre = weights.source_preprocessing(config.model.name, weights.resolve(spec))
  if pre:
    given = {'mean': tuple(pre['mean']), 'std': tuple(pre['std']),
             'interpolation': pre['interpolation'],
             'eval_resize': int(math.floor(d.image_size / pre['crop_pct']))}
  else:
    given = {'mean': normalization.IMAGENET_MEAN, 'std': normalization.IMAGENET_STD,
             'interpolation': dataset.DEFAULT_INTERPOLATION}
  taken = {k: v for k, v in given.items() if _is_auto(d[k], _AUTO_DATA[k])}
  for k, v in taken.items():
    d[k] = v
  if not pre:
    return (None if not spec.startswith('timm:') else
            f'{spec}: no preprocessing known from the weights (no config.json, no timm '
            'registry entry): ImageNet mean / std, bilinear; set data.mean / data.std / '
            'data.interpolation if they were trained otherwise')
  kept = sorted(set(given) - set(taken))
  return (f'preprocessing from {pre["source"]}: '
          + ', '.join(f'data.{k}={v}' for k, v in taken.items())
          + (f' (crop {pre["crop_pct"]})' if 'eval_resize' in taken else '')
          + (f'; kept the config\'s {", ".join("data." + k for k in kept)}' if kept else ''))


def _is_auto(value: Any, auto: Any) -> bool:
  return value == auto or (isinstance(auto, tuple) and not auto and len(value) == 0)


def initial_variables(config: ml_collections.ConfigDict, model, image_size: int) -> dict:
  """Random init, or pretrained weights converted (`init.weights` / `init.torchvision`:
  `convert.load_weights`); with `init.zero_head` the head's kernel and bias start at zero."""
  variables = _loaded_or_random(config, model, image_size)
  if config.init.zero_head:
    head = models.spec(config.model.name).head
    variables = {**variables, 'params': optim.zero_head(variables['params'], head)}
  return variables


def _loaded_or_random(config: ml_collections.ConfigDict, model, image_size: int) -> dict:
  spec = weights_spec(config.init)
  if spec:
    from flowers_jax import convert  # torch only needed for .pth files
    variables, report = convert.load_weights(
        config.model.name, spec, num_classes=config.model.num_classes,
        rng=jax.random.key(config.seed), allow_partial=config.init.allow_partial,
        **model_options(config.model))
    log(report.summary())
    return variables
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  variables = jax.jit(lambda: model.init({'params': init_rng, 'dropout': dropout_rng}, x,
                                         train=False))()
  return jax.device_get(variables)


class Averager:
  """Host-side running sums of step metrics (train loss weighted by rows).

  `sums()` goes into the checkpoint on a mid-epoch stop and `Averager(*sums)` picks it up on
  resume, so the interrupted epoch's train_loss / train_accuracy cover all of its steps.
  """

  def __init__(self, loss: float = 0.0, correct: float = 0.0, count: float = 0.0):
    self.loss, self.correct, self.count = loss, correct, count

  def sums(self) -> list[float]:
    return [self.loss, self.correct, self.count]

  def add(self, m: dict) -> None:
    self.loss += float(m['loss']) * float(m['count'])
    self.correct += float(m['correct'])
    self.count += float(m['count'])

  def result(self) -> dict:
    n = max(self.count, 1.0)
    return {'train_loss': self.loss / n, 'train_accuracy': self.correct / n}


def evaluate(run: 'Run', state, split: str) -> evaluators.Evaluation:
  """The run's evaluators (`config.evals`) on every example of `split` exactly once."""
  return evaluators.evaluate(run.evaluators, run.config.evals, run.eval_step, run.strategy,
                             state, run.ds, split, run.config.train.eval_batch_size)


# ------------------------------------------------------------------------------------------
# Files in the workdir (process 0 writes them).


def _strict_json(obj: Any) -> Any:
  """`obj` with every non-finite float replaced by None (metrics files stay strict JSON)."""
  if isinstance(obj, dict):
    return {k: _strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_strict_json(v) for v in obj]
  if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
    return None
  return obj


def _dumps(obj: Any, **kwargs) -> str:
  return json.dumps(_strict_json(obj), allow_nan=False, **kwargs)


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      f.write(_dumps(obj, indent=2, sort_keys=True))
    os.replace(path + '.tmp', path)


def _write_jsonl(path: str, rows: list[dict]) -> None:
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      f.writelines(_dumps(row) + '\n' for row in rows)
    os.replace(path + '.tmp', path)


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _flat_config(config_dict: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in config_dict.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(saved: dict, config: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, config's value)} of the keys that differ between a saved
  config.json dict and `config`, sorted, `NOT_COMPARED_KEYS` left out."""
  old = _flat_config(saved)
  new = _flat_config(json.loads(_dumps(config.to_dict())))
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k) and not k.startswith(NOT_COMPARED_KEYS)}


def _check_config_change(saved: dict | None, config: ml_collections.ConfigDict,
                         workdir: str) -> None:
  """On resume: one line naming what changed; ValueError for a change of what the state means."""
  if not saved:
    return
  changed = config_changes(saved, config)
  if not changed:
    return
  what = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changed.items())
  refused = [k for k in changed if k.startswith(STATE_DEFINING_KEYS)]
  if refused:
    raise ValueError(f'{workdir} holds a checkpoint of another model or loss ({what}); '
                     'resume with its config or use a new --workdir')
  log(f'resuming with a config that differs from the checkpoint\'s: {what}')


# ------------------------------------------------------------------------------------------
# The run's parts and the loop's state.


@dataclasses.dataclass
class Run:
  """What `_build` makes once: data, strategy, compiled steps, schedule, checkpoints.

  Durations are in optimizer steps: `total_steps` (`train.steps`, or `train.epochs` x
  `steps_per_epoch`), a validation every `eval_every` and after the last step, `latest` every
  `checkpoint_every` (with each validation by default). One optimizer step is `accum` calls of
  the train step on microbatches of `train.batch_size / accum` images.
  """
  config: ml_collections.ConfigDict
  workdir: str
  ds: Any
  strategy: Any
  model: Any
  tx: Any
  schedule: Any
  train_step: Any
  eval_step: Any
  evaluators: tuple
  checkpoints: ckpt_lib.Checkpointer | None
  steps_per_epoch: int
  counts: dict
  total_steps: int = 0
  eval_every: int = 0
  checkpoint_every: int = 0
  accum: int = 1
  augment: Any = None  # device_pp.Augmenter: train augmentation on the device (data.on_device)

  def epochs(self, step: int) -> float:
    """Passes over the train split's steps after `step` optimizer steps (an int when whole)."""
    e = step / self.steps_per_epoch
    return int(e) if e == int(e) else round(e, 4)

  def validates(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def saves_latest(self, step: int) -> bool:
    if self.checkpoints is None:
      return False
    if self.checkpoint_every:
      return step % self.checkpoint_every == 0 or step == self.total_steps
    return self.validates(step)


class Best:
  """The best validation accuracy and its step. With checkpoints, `best/`'s meta is the one
  record (read back on resume); without, the best state is kept in memory."""

  def __init__(self, checkpoints: ckpt_lib.Checkpointer | None):
    self.checkpoints = checkpoints
    meta = checkpoints.best_meta() if checkpoints is not None else None
    self.epoch = meta['epoch'] if meta else -1
    self.step = int(meta.get('step', -1)) if meta else -1
    self.val_accuracy = float(meta['val_accuracy']) if meta else -math.inf
    self.state = None

  def offer(self, step: int, epoch: float, val_accuracy: float, ckpt_step: int,
            host_state: Callable[[], Any]) -> bool:
    """Records (and saves) `host_state()` if `val_accuracy` beats the best; returns whether."""
    if not val_accuracy > self.val_accuracy:
      return False
    self.step, self.epoch, self.val_accuracy = step, epoch, val_accuracy
    if self.checkpoints is None:
      self.state = host_state()
    else:
      self.checkpoints.save_best(ckpt_step, host_state(), {
          'step': step, 'epoch': epoch, 'val_accuracy': val_accuracy}, wait=False)
    return True


# Where a run's wall time goes (results.json `<bucket>_s`); `train_time` is the rest.
TIME_BUCKETS = ('compile_time', 'eval_time', 'checkpoint_wait', 'input_wait')
# Inside `train_time`: blocked reading a step's metrics, i.e. waiting for the device. The rest
# of train_time is the host's own work per step (`host_overhead`: Python, dispatch, metric
# bookkeeping, handing batches to the device), which a fast device waits on.
DEVICE_WAIT = 'device_wait'
ROW_MARKS = ('train_images', 'train_time', 'input_wait', DEVICE_WAIT)


def host_overhead(totals: dict) -> float:
  """Seconds of `train_time` the host spent on its own work, not waiting for the device."""
  return max(totals['train_time'] - totals[DEVICE_WAIT], 0.0)


@dataclasses.dataclass
class Loop:
  """Where the loop is and what it has measured; `meta()` is what `latest` stores."""
  step: int = 0                   # optimizer steps completed
  calls: int = 0                  # train-step calls completed (step * accum + microbatches)
  train_sums: list = dataclasses.field(default_factory=list)  # since the last validation
  history: list = dataclasses.field(default_factory=list)
  times: dict = dataclasses.field(
      default_factory=lambda: dict.fromkeys(TIME_BUCKETS + ('train_time', DEVICE_WAIT), 0.0))
  train_images: int = 0           # images of the timed train steps (compile step excluded)
  earlier_wall_time: float = 0.0  # seconds spent by the processes before a resume
  compiled: bool = False          # this process has compiled (and run) the train step
  started: float | None = None    # this process's loop start (None: not training)
  at_start: dict = dataclasses.field(default_factory=dict)  # `times` at `started`
  row_mark: tuple = (0, 0.0, 0.0, 0.0)  # `ROW_MARKS` at the last metrics row

  def start(self) -> None:
    self.started, self.at_start = time.time(), dict(self.times)

  def stop(self) -> None:
    """Ends `train_time` here (the test and the files after it are not training)."""
    self.times['train_time'] = self.totals()['train_time']
    self.started = None

  @contextlib.contextmanager
  def timing(self, bucket: str):
    """Adds the time spent in the block to `times[bucket]`."""
    t = time.time()
    try:
      yield
    finally:
      self.times[bucket] += time.time() - t

  def totals(self) -> dict:
    """`times` with `train_time` brought up to now: this process's loop time that no bucket
    took (the train steps, their metric reads and the host's work between them)."""
    if self.started is None:
      return {**self.times, 'train_images': self.train_images}
    others = sum(self.times[k] - self.at_start.get(k, 0.0) for k in TIME_BUCKETS)
    train_time = (self.at_start.get('train_time', 0.0) + time.time() - self.started - others)
    return {**self.times, 'train_time': train_time, 'train_images': self.train_images}

  def meta(self, run: Run, wall_time: float) -> dict:
    return {'step': self.step, 'calls': self.calls, 'epoch': self.step // run.steps_per_epoch,
            'step_in_epoch': self.step % run.steps_per_epoch,
            'train_sums': list(self.train_sums), 'config': run.config.to_dict(),
            'totals': {**self.totals(), 'wall_time': self.earlier_wall_time + wall_time}}


def _check_batch_size(global_batch: int, what: str) -> None:
  n = jax.device_count()
  if global_batch % n:
    raise ValueError(f'{what}={global_batch} must be divisible by the number of devices ({n})')


def _check_splits(ds, data_cfg: ml_collections.ConfigDict) -> None:
  """Every split the run reads is there, and every class has train images, before anything is
  built; a class absent from validation or test is said in one line (its per-class accuracy is
  null there)."""
  missing = [s for s in RUN_SPLITS if s not in ds.splits]
  if missing:
    raise ValueError(f'the data set in {data_cfg.dir} ({data_cfg.source}) has no '
                     f'{" and no ".join(missing)} split; a run trains on train, picks its best '
                     'epoch on validation and tests on test' +
                     ('; add DIR/validation (or DIR/val) and DIR/test'
                      if data_cfg.source == 'imagefolder' else ''))
  for split in RUN_SPLITS:
    counts = np.bincount(ds.splits[split].labels, minlength=ds.num_classes)
    absent = [ds.class_names[i] for i in np.flatnonzero(counts == 0)]
    if not absent:
      continue
    shown = ', '.join(map(repr, absent[:5])) + (f' and {len(absent) - 5} more'
                                                if len(absent) > 5 else '')
    if split == 'train':
      raise ValueError(f'{len(absent)} of {ds.num_classes} classes have no train image '
                       f'({shown}) in {data_cfg.dir}; a class with no train image cannot be '
                       'learned: add images or remove the class')
    log(f'warning: split {split!r} has no image of {len(absent)} class(es) ({shown}): their '
        'per-class accuracy is null and they count in no accuracy')


def _input_path(ds, strategy) -> tuple[Any, str]:
  """(a `device_pp.Augmenter`, or None for the host path; the log line saying which and why).

  `data.on_device`: 'host' (tf.data augments; uint8 batches, normalised on the device),
  'device' (the train split decoded once and held on every device as uint8,
  `data.device_cache`; augmented there, `data.device_pp`; refused with one line when
  pp_train has an op with no device version), 'auto' (device on an accelerator when every op
  has a device version and the split takes at most `DEVICE_CACHE_SHARE` of a device's
  memory on every process; on CPU the host path, which is faster there: docs/benchmarks.md).
  """
  from flowers_jax.data import device_cache, device_pp, pp
  cfg = ds.config
  if cfg.on_device == 'host':
    return None, 'input: host (data.on_device=host): tf.data augments, uint8 batches'
  pipe = pp.from_config(cfg, 'pp_train')
  missing = device_pp.unsupported(pipe)
  if missing and cfg.on_device == 'device':
    raise ValueError(f'data.on_device=device: {missing}')
  if missing:
    return None, f'input: host (data.on_device=auto; {missing[:-1]} for the device path)'
  if cfg.on_device == 'auto' and jax.default_backend() == 'cpu':
    return None, ('input: host (data.on_device=auto on CPU: tf.data is the faster path there;'
                  ' data.on_device=device forces the device path)')
  cache = ds.device_cache('train')
  limit, where = device_cache.device_memory()
  size = f'{cache.nbytes / 2**20:.0f} MiB of uint8 (shorter side <= {cfg.device_cache_size})'
  if cfg.on_device == 'auto' and not ckpt_lib.all_processes(device_cache.fits(cache.nbytes)):
    return None, (f'input: host (data.on_device=auto: the train split takes {size}, more than'
                  f' {device_cache.DEVICE_CACHE_SHARE:.0%} of {limit / 2**30:.1f} GiB, {where})')
  return device_pp.Augmenter(cache, pipe, strategy), (
      f'input: device (data.on_device={cfg.on_device}): the train split held on each device,'
      f' {size}; augmented there')


def _build(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, TrainState]:
  """Data, model, initial state, optimizer and the compiled steps."""
  from flowers_jax import data  # tensorflow only from here on (data imports it safely)
  tc = config.train
  _check_batch_size(tc.batch_size // tc.accum_steps,
                    'train.batch_size / train.accum_steps' if tc.accum_steps > 1
                    else 'train.batch_size')
  _check_batch_size(tc.eval_batch_size, 'train.eval_batch_size')
  strategy = parallel.make(config.parallel)
  model = create_model(config, bn_axis_name=strategy.axis_name)
  # The data set's files and headers first (seconds, no TensorFlow), then the weights (a torch
  # import or an init compile): a wrong path or class count stops before either.
  ds = data.build(config.data, seed=config.seed)
  if ds.num_classes != config.model.num_classes:
    raise ValueError(f'the data set has {ds.num_classes} classes but model.num_classes='
                     f'{config.model.num_classes}; set --config.model.num_classes={ds.num_classes}')
  _check_splits(ds, config.data)
  variables = initial_variables(config, model, config.data.image_size)
  steps_per_epoch = ds.steps_per_epoch(tc.batch_size)
  if tc.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
  total_steps = tc.steps or steps_per_epoch * tc.epochs
  eval_every = config.evals.every_steps or steps_per_epoch
  micro = (f' ({tc.accum_steps} microbatches of {tc.batch_size // tc.accum_steps})'
           if tc.accum_steps > 1 else '')
  log(f'{total_steps} steps of {tc.batch_size} images{micro}'
      f' = {total_steps / steps_per_epoch:.4g} epochs of {steps_per_epoch} steps'
      f' ({"train.steps" if tc.steps else "train.epochs"} in force); validation every '
      f'{eval_every} steps and after the last')
  spec = models.spec(config.model.name)
  tx = optim.make_optimizer(config.optim, variables['params'], total_steps=total_steps,
                            freeze=tc.freeze, head_pattern=spec.head,
                            no_decay=spec.no_weight_decay, model_name=config.model.name)
  tx = steps.accumulating(tx, tc.accum_steps, variables['params'])
  trainable = optim.trainable_mask(variables['params'], tc.freeze, spec.head)
  counts = optim.describe(variables['params'], trainable)
  bn_batch = batchnorm_uses_batch_stats(tc)
  lr_scales = optim.describe_lr_scales(
      optim.lr_scales(variables['params'], config.optim, config.model.name), trainable)
  log(f'model {config.model.name}: {counts}; BatchNorm on '
      f'{"batch" if bn_batch else "running"} statistics; {lr_scales}')
  augment, said = _input_path(ds, strategy)
  log(said)
  pixels = dict(mean=ds.config.mean, std=ds.config.std)  # uint8 batches, normalised on device
  train_step = strategy.compile(steps.make_train_step(
      model, tx, tc, axis_name=strategy.axis_name, bn_train=bn_batch, **pixels))
  evals = evaluators.get(config.evals.names)
  eval_step = strategy.compile(evaluators.make_eval_step(
      model, evals, config.evals, axis_name=strategy.axis_name, **pixels), donate_state=False)
  run = Run(config, workdir, ds, strategy, model, tx,
            optim.make_schedule(config.optim, total_steps), train_step, eval_step, evals,
            ckpt_lib.Checkpointer(workdir) if tc.checkpoint else None, steps_per_epoch, counts,
            total_steps=total_steps, eval_every=eval_every,
            checkpoint_every=tc.checkpoint_every_steps, accum=tc.accum_steps, augment=augment)
  return run, TrainState.create(variables, tx, config.seed, ema=tc.ema_decay > 0)


def _resume(run: Run, state: TrainState) -> tuple[Loop, TrainState]:
  """The loop's state and the train state from `latest`, or a fresh start."""
  loop = Loop()
  restored = None
  if run.checkpoints is not None:  # the newest intact latest; its config checked first
    restored = run.checkpoints.restore_latest(
        state, check=lambda meta: _check_config_change(meta.get('config'), run.config,
                                                       run.workdir), say=log)
  if restored is not None:
    state, meta = restored
    loop.train_sums = meta.get('train_sums', [])
    totals = meta.get('totals', {})
    for k in loop.times:
      loop.times[k] = float(totals.get(k, 0.0))
    loop.train_images = int(totals.get('train_images', 0))
    loop.earlier_wall_time = float(totals.get('wall_time', 0.0))
    loop.row_mark = tuple(loop.totals()[k] for k in ROW_MARKS)
  loop.calls = int(state.step)
  loop.step = loop.calls // run.accum
  if restored is not None:
    within = loop.calls % run.accum
    log(f'resumed from step {loop.step} (epoch {run.epochs(loop.step)})'
        f'{f", microbatch {within} of {run.accum}" if within else ""}')
  # Rows the checkpoint has not seen (a kill between the two writes) are dropped.
  metrics_path = os.path.join(run.workdir, 'metrics.jsonl')
  loop.history = [m for m in _read_jsonl(metrics_path) if m.get('step', 0) <= loop.step]
  _write_jsonl(metrics_path, loop.history)
  return loop, state


def _with_stop_flag(batches: Iterator[dict]) -> Iterator[dict]:
  """Adds `stop [b]`: this host's stop-signal number when the batch is made (0: none)."""
  for batch in batches:
    rows = batch['label'].shape[0]
    yield {**batch, 'stop': np.full((rows,), ckpt_lib.stop_signal(), np.float32)}


def _checked(metrics: dict, step: int) -> dict:
  """Returns `metrics`, or stops the run if the step made anything non-finite (nothing saved)."""
  loss = float(metrics['loss'])
  if not math.isfinite(loss) or float(metrics['finite']) < 1.0:
    what = f'loss ({loss})' if not math.isfinite(loss) else 'parameters after the update'
    raise NonFiniteLossError(
        f'non-finite {what} at step {step}; the run stopped without saving it and the last '
        'good checkpoint is kept. Try a lower optim.lr or optim.clip_norm=1.0')
  return metrics


def _save_latest(run: Run, loop: Loop, host_state: Callable[[], Any], t_start: float) -> None:
  """`latest` at this call, written asynchronously: the loop waits only for the previous save
  and the copy of the state to the host (`host_state()`)."""
  if run.checkpoints is None:
    return
  with loop.timing('checkpoint_wait'):
    run.checkpoints.save_latest(loop.calls, host_state(),
                                loop.meta(run, time.time() - t_start), wait=False)


class _Pending:
  """The metrics of the newest train step, read one step later (reading them then does not
  stall the device), checked, and added to the running train averages."""

  def __init__(self, loop: Loop):
    self.loop, self.metrics, self.last = loop, None, None
    self.avg = Averager(*loop.train_sums)
    self.signum = 0

  def push(self, metrics, strategy) -> None:
    """`metrics` of call `loop.calls` (already counted); the previous call's are read."""
    self.flush(strategy)
    self.metrics, self.call = metrics, self.loop.calls

  def flush(self, strategy) -> None:
    if self.metrics is None:
      return
    with self.loop.timing(DEVICE_WAIT):
      metrics = strategy.get_metrics(self.metrics)
    self.last = _checked(metrics, self.call)
    self.avg.add(self.last)
    self.signum = self.signum or int(self.last['stop'])
    self.metrics = None
    self.loop.train_sums = self.avg.sums()


def _train(run: Run, loop: Loop, state, best: Best, writer, t_start: float):
  """Runs the steps left, validating and saving on the run's cadence; returns the state.

  The input is one stream for the whole run (`Dataset.train_stream`, or with the device path
  `device_train_stream` + `run.augment`: `_input_path`; microbatches of
  `batch_size / accum` rows), started at this call. A stop signal travels with the batches
  (`_with_stop_flag`); the step returns the largest over all hosts, so every process sees it
  in the same step's metrics and stops after the same call.
  """
  tc, strategy = run.config.train, run.strategy
  micro_images = tc.batch_size // run.accum
  make_stream = run.ds.train_stream if run.augment is None else run.ds.device_train_stream
  with loop.timing('input_wait'):  # building the tf.data stream is the input's time too
    stream = make_stream(micro_images, start_step=loop.calls,
                         sampler=losses.get(tc.loss).sampler, pk_k=tc.pk_k)
  batches = parallel.prefetch_to_device(_with_stop_flag(stream), strategy)
  if run.augment is not None:  # the pixels made on the device, from the cache and the draws
    batches = map(run.augment, batches)
  pending = _Pending(loop)
  while loop.step < run.total_steps:
    with loop.timing('input_wait'):
      batch = next(batches)
    t0 = time.time()
    state, metrics = run.train_step(state, batch)
    if not loop.compiled:  # the first call compiles (not AOT: multi-process pmap can't)
      jax.block_until_ready(metrics)
      loop.times['compile_time'] += time.time() - t0
      loop.compiled = True
      log(f'compiled and ran the first train step in {time.time() - t0:.1f}s')
    else:
      loop.train_images += micro_images
    loop.calls += 1
    pending.push(metrics, strategy)
    boundary = loop.calls % run.accum == 0
    if boundary:
      loop.step += 1
      if not run.validates(loop.step):  # a validation says more
        _log_progress(run, loop, pending.last)
    validate = boundary and run.validates(loop.step)
    save = boundary and run.saves_latest(loop.step)
    if validate or save or pending.signum:
      pending.flush(strategy)
      # The state on the host, copied once for `best` and `latest`, and only if one saves.
      host_state = functools.cache(functools.partial(strategy.get_state, state))
    if validate:
      _validate(run, loop, state, host_state, pending, best, writer, t_start)
    if save or pending.signum:
      _save_latest(run, loop, host_state, t_start)
    if pending.signum:
      _exit_on_signal(run, loop, pending.signum)
  pending.flush(strategy)
  loop.stop()
  return state


def _log_progress(run: Run, loop: Loop, last: dict | None) -> None:
  """A progress line every `train.log_every` steps: loss, images/s and the ETA, from the
  train-step time alone (`Loop.totals`: compile, validation, saves and input waits left out)."""
  if loop.step % run.config.train.log_every or last is None:
    return
  where = (f'step {loop.step}/{run.total_steps} (epoch {run.epochs(loop.step)}) '
           f'loss {float(last["loss"]):.4f}')
  rate = _rate(loop.train_images, loop.totals()['train_time'])
  if rate is None:
    log(where)
    return
  left = (run.total_steps - loop.step) * run.config.train.batch_size
  log(f'{where} {rate:.1f} img/s ETA {_hms(left / rate)}')


def _rate(images: int, seconds: float) -> float | None:
  return images / seconds if images > 0 and seconds > 0 else None


def _validate(run: Run, loop: Loop, state, host_state: Callable[[], Any], pending: _Pending,
              best: Best, writer, t_start: float) -> None:
  """Validation (of the EMA weights too), the metrics row, then `best` if improved."""
  with loop.timing('eval_time'):
    val = evaluate(run, state, 'validation').scalars
    ema = evaluate(run, state.ema_view(), 'validation').scalars if state.ema else {}
  if not math.isfinite(val['loss']):
    raise NonFiniteLossError(
        f'non-finite validation loss ({val["loss"]}) after step {loop.step}; the run '
        'stopped without saving it and the last good checkpoint is kept')
  epoch = run.epochs(loop.step)
  totals = loop.totals()
  mark = tuple(totals[k] for k in ROW_MARKS)
  since = dict(zip(ROW_MARKS, (now - then for now, then in zip(mark, loop.row_mark))))
  loop.row_mark = mark
  row = {'step': loop.step, 'images_seen': loop.step * run.config.train.batch_size,
         'epoch': epoch, **pending.avg.result(), **{f'val_{k}': v for k, v in val.items()},
         **{f'val_ema_{k}': v for k, v in ema.items()},
         'lr': float(run.schedule(loop.step - 1)),
         'wall_time_s': loop.earlier_wall_time + time.time() - t_start,
         'images_per_s': _rate(since['train_images'], since['train_time']),
         'input_wait_s': since['input_wait'], 'host_overhead_s': host_overhead(since)}
  with loop.timing('checkpoint_wait'):
    improved = best.offer(loop.step, epoch, val['accuracy'], loop.calls, host_state)
  pending.avg = Averager()
  loop.train_sums = []
  loop.history.append(row)
  _write_jsonl(os.path.join(run.workdir, 'metrics.jsonl'), loop.history)
  writer.write_scalars(loop.step, {k: v for k, v in _strict_json(row).items()
                                   if k != 'step' and v is not None})
  writer.flush()
  knn = f' val_knn_acc {val["knn_accuracy"]:.4f}' if 'knn_accuracy' in val else ''
  ema_acc = f' val_ema_acc {ema["accuracy"]:.4f}' if ema else ''
  log(f'step {loop.step}/{run.total_steps} (epoch {epoch}): train_loss {row["train_loss"]:.4f} '
      f'train_acc {row["train_accuracy"]:.4f} val_loss {val["loss"]:.4f} '
      f'val_acc {val["accuracy"]:.4f}{knn}{ema_acc}{"  (best)" if improved else ""}')


def _tested_state(run: Run, state, best: Best):
  """The host state `train.test_checkpoint` names: 'best' (by validation) or 'final'."""
  final = run.strategy.get_state(state)
  if run.config.train.test_checkpoint == 'final':
    return final
  if run.checkpoints is not None:
    restored = run.checkpoints.restore_best(final)
    return restored[0] if restored is not None else final
  return best.state if best.state is not None else final


def _finish(run: Run, loop: Loop, state, best: Best, t_start: float) -> dict:
  """Test accuracy of the tested state (and its EMA); results.json and curves.png."""
  from flowers_jax import plots
  config, strategy = run.config, run.strategy
  if run.checkpoints is not None:
    with loop.timing('checkpoint_wait'):
      run.checkpoints.wait()
  tested = strategy.put_state(_tested_state(run, state, best))
  with loop.timing('eval_time'):
    test = evaluate(run, tested, 'test')
    ema = evaluate(run, tested.ema_view(), 'test').scalars if tested.ema else {}
  totals = loop.totals()
  tested_step = best.step if config.train.test_checkpoint == 'best' else loop.step
  results = {
      'model': config.model.name, 'variant': config.variant,
      'test_checkpoint': config.train.test_checkpoint, 'tested_step': tested_step,
      'best_step': best.step, 'best_epoch': best.epoch, 'best_val_accuracy': best.val_accuracy,
      **{f'test_{k}': v for k, v in test.scalars.items()},
      **{f'test_ema_{k}': v for k, v in ema.items()},
      'test_per_class_accuracy': dict(zip(run.ds.class_names,
                                           test.arrays['per_class_accuracy'].tolist())),
      'steps': run.total_steps, 'epochs': run.epochs(run.total_steps),
      'images_seen': run.total_steps * config.train.batch_size,
      'validations': len(loop.history),
      'wall_time_s': loop.earlier_wall_time + time.time() - t_start,
      **{f'{k}_s': totals[k] for k in TIME_BUCKETS + ('train_time', DEVICE_WAIT)},
      'host_overhead_s': host_overhead(totals),
      'train_images_per_s': _rate(loop.train_images, totals['train_time']),
      'devices': jax.device_count(), 'parallel': config.parallel, **run.counts,
  }
  results['train_mfu'] = _mfu(config, results['train_images_per_s'])
  _write_json(os.path.join(run.workdir, 'results.json'), results)
  title = f'{config.model.name} {config.variant}'
  if jax.process_index() == 0:
    for name, array in test.arrays.items():
      np.save(os.path.join(run.workdir, f'{name}_test.npy'), array)
    plots.plot_curves(loop.history, os.path.join(run.workdir, 'curves.png'), title=title)
    plots.plot_confusion(test.arrays['confusion'], run.ds.class_names,
                         os.path.join(run.workdir, 'confusion_test.png'), title=title)
  log(f'test accuracy ({config.train.test_checkpoint} state, step {tested_step}): '
      f'{test.scalars["accuracy"]:.4f}; results in {os.path.join(run.workdir, "results.json")}')
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns results.json.

  Exits with `SystemExit(128 + signal)` (143 SIGTERM, 130 Ctrl-C) after saving `latest` when
  any process of the run received a stop signal.
  """
  t_start = time.time()
  config_checks.validate(config)
  said = resolve_preprocessing(config)
  if said:
    log(said)
  with WorkdirLock(workdir):  # before anything in the workdir is read or written
    try:
      return _train_and_evaluate(config, workdir, t_start)
    finally:  # the SIGTERM / SIGINT handlers the loop installed go, however it ends
      ckpt_lib.restore_signal_handlers()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, t_start: float) -> dict:
  run, state = _build(config, workdir)
  loop, state = _resume(run, state)
  if run.checkpoints is not None:
    run.checkpoints.check_room(state)
  _write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  _write_json(os.path.join(workdir, CLASS_NAMES_FILE), list(run.ds.class_names))
  best = Best(run.checkpoints)
  state = run.strategy.put_state(state)
  ckpt_lib.install_signal_handlers()
  writer = _metric_writer(workdir)
  loop.start()
  state = _train(run, loop, state, best, writer, t_start)
  return _finish(run, loop, state, best, t_start)


def _mfu(config: ml_collections.ConfigDict, images_per_s: float | None) -> float | None:
  """Training model-FLOPs utilisation per device (`flops.mfu`), None where FLOPs or the
  device's peak are unknown (CPUs)."""
  from flowers_jax import flops
  name = config.model.name
  if config.model.get('deform', 'none') != 'none':
    name = f'{name}_deform_{config.model.deform}'
  if not images_per_s or not flops.known(name):
    return None
  return flops.mfu(name, config.data.image_size, images_per_s / jax.device_count(),
                   jax.devices()[0].device_kind, config.train.dtype)


def _exit_on_signal(run: Run, loop: Loop, signum: int) -> None:
  if run.checkpoints is not None:
    with loop.timing('checkpoint_wait'):
      run.checkpoints.wait()
  within = loop.calls % run.accum
  where = (f'at step {loop.step} (epoch {run.epochs(loop.step)})'
           f'{f", microbatch {within} of {run.accum}" if within else ""}')
  log(f'interrupted: saved a checkpoint {where}; run the same command again to resume')
  raise SystemExit(128 + signum)


def _metric_writer(workdir: str):
  """TensorBoard event files in `workdir` (clu), written by process 0 only."""
  from flowers_jax.data import tf_import
  tf_import.import_tf()  # before clu imports it: GPUs hidden, no import banners
  from clu import metric_writers
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                              asynchronous=False)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
