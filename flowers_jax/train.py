"""The training loop: data -> model -> optimizer -> epochs of train + validation -> test at best.

`train_and_evaluate(config, workdir)` is all that `main.py` calls. It writes into `workdir`:

  config.json     the resolved config
  metrics.jsonl   one JSON object per epoch (epoch, train_loss, train_accuracy, val_loss,
                  val_accuracy, val_top5, lr, images_per_s, ...)
  checkpoints/    orbax: `latest` (every epoch and on SIGTERM/Ctrl-C) and `best` (by val accuracy)
  curves.png      train / validation accuracy per epoch
  results.json    best_epoch, best_val_accuracy, test_accuracy (of the best checkpoint), wall time,
                  train images/s, compile time (of the first train step, which it includes),
                  parameter counts
  tensorboard events (clu metric writers)

A run started again on the same workdir resumes from `latest`: the same parameters, optimizer
state, rng and position in the data, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowers_jax import checkpoint as ckpt_lib
from flowers_jax import losses, models, optim, parallel, steps
from flowers_jax.steps import TrainState

MODEL_KEYS = ('name', 'num_classes')  # every other key of config.model is a model option
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
  pass


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


def initial_variables(config: ml_collections.ConfigDict, model, image_size: int) -> dict:
  """Random init, or torchvision weights converted (`init.torchvision`: .pth or converted dir)."""
  if config.init.torchvision:
    from flowers_jax import convert  # torch only needed for .pth files
    variables, report = convert.torchvision_to_flax(
        config.model.name, config.init.torchvision, num_classes=config.model.num_classes,
        rng=jax.random.key(config.seed), **model_options(config.model))
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


def evaluate(eval_step, strategy, state, ds, split: str, batch_size: int) -> dict:
  """Accuracy / loss over every example of `split` exactly once (padding is masked out)."""
  totals = None
  for batch in ds.eval_batches(split, batch_size):
    m = strategy.get_metrics(eval_step(state, strategy.put_batch(batch)))
    totals = m if totals is None else jax.tree.map(np.add, totals, m)
  n = float(totals['count'])
  return {'accuracy': float(totals['correct']) / n, 'top5': float(totals['correct5']) / n,
          'loss': float(totals['loss_sum']) / n, 'count': int(n)}


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


def _append_jsonl(path: str, obj: dict) -> None:
  if jax.process_index() == 0:
    with open(path, 'a') as f:
      f.write(json.dumps(obj) + '\n')


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _check_batch_size(global_batch: int, what: str) -> None:
  n = jax.device_count()
  if global_batch % n:
    raise ValueError(f'{what}={global_batch} must be divisible by the number of devices ({n})')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns results.json."""
  from flowers_jax import data, plots  # tensorflow only from here on (data imports it safely)
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  metrics_path = os.path.join(workdir, 'metrics.jsonl')

  tc = config.train
  _check_batch_size(tc.batch_size, 'train.batch_size')
  _check_batch_size(tc.eval_batch_size, 'train.eval_batch_size')
  ds = data.build(config.data, seed=config.seed)
  if ds.num_classes != config.model.num_classes:
    raise ValueError(f'the data set has {ds.num_classes} classes but model.num_classes='
                     f'{config.model.num_classes}; set --config.model.num_classes={ds.num_classes}')
  strategy = parallel.make(config.parallel)
  model = create_model(config, bn_axis_name=strategy.axis_name)

  steps_per_epoch = ds.steps_per_epoch(tc.batch_size)
  if tc.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
  total_steps = steps_per_epoch * tc.epochs
  variables = initial_variables(config, model, config.data.image_size)
  head = models.HEAD_PATTERNS[config.model.name]
  tx = optim.make_optimizer(config.optim, variables['params'], total_steps=total_steps,
                            freeze=tc.freeze, head_pattern=head)
  mask = optim.trainable_mask(variables['params'], tc.freeze, head)
  counts = optim.describe(variables['params'], mask)
  log(f'model {config.model.name}: {counts}')
  state = TrainState.create(variables, tx, config.seed)
  schedule = optim.make_schedule(config.optim, total_steps)

  checkpoints = ckpt_lib.Checkpointer(workdir) if tc.checkpoint else None
  start_epoch, start_step, best_val, best_epoch = 0, 0, -1.0, -1
  start_sums = []
  if checkpoints is not None:
    restored = checkpoints.restore_latest(state)
    if restored is not None:
      state, meta = restored
      start_epoch, start_step = meta['epoch'], meta['step_in_epoch']
      best_val, best_epoch = meta['best_val_accuracy'], meta['best_epoch']
      start_sums = meta.get('train_sums', [])
      log(f'resumed from step {int(state.step)} (epoch {start_epoch + 1}, step {start_step})')
  host_step = int(state.step)
  # Rows of epochs the checkpoint has not seen (a kill between the two writes) are dropped.
  history = [m for m in _read_jsonl(metrics_path) if m['epoch'] <= start_epoch]
  if jax.process_index() == 0:
    with open(metrics_path, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in history)

  bn_train = tc.freeze == 'none'
  train_step = strategy.compile(steps.make_train_step(model, tx, tc, axis_name=strategy.axis_name,
                                                      bn_train=bn_train))
  eval_step = strategy.compile(steps.make_eval_step(model, axis_name=strategy.axis_name),
                               donate_state=False)
  sampler = losses.SAMPLER[tc.loss]
  state = strategy.put_state(state)
  ckpt_lib.install_signal_handlers()

  def save(epoch, step_in_epoch, val=None, train_sums=()):
    if checkpoints is None:
      return
    meta = {'epoch': epoch, 'step_in_epoch': step_in_epoch, 'best_val_accuracy': best_val,
            'best_epoch': best_epoch, 'train_sums': list(train_sums)}
    host_state = strategy.get_state(state)
    checkpoints.save_latest(host_step, host_state, meta)
    if val is not None:
      checkpoints.save_best(host_step, host_state, meta, val)

  writer = _metric_writer(workdir)
  compile_time, train_time, train_images = 0.0, 0.0, 0
  for epoch in range(start_epoch, tc.epochs):
    first = start_step if epoch == start_epoch else 0
    avg = Averager(*start_sums) if epoch == start_epoch else Averager()
    pending, last, t_epoch = None, None, time.time()
    batches = parallel.prefetch_to_device(
        ds.train_batches(tc.batch_size, epoch, start_step=first, sampler=sampler, pk_k=tc.pk_k),
        strategy)
    for step_in_epoch in range(first, steps_per_epoch):
      batch = next(batches)
      t0 = time.time()
      state, metrics = train_step(state, batch)
      if compile_time == 0.0:  # the first call compiles (not AOT: multi-process pmap can't)
        jax.block_until_ready(metrics)
        compile_time = time.time() - t0
        log(f'compiled and ran the first train step in {compile_time:.1f}s')
      host_step += 1
      if pending is not None:  # the previous step's metrics: checking them does not stall
        last = _checked(strategy.get_metrics(pending), host_step - 1)
        avg.add(last)
      pending = metrics
      train_images += tc.batch_size
      if (step_in_epoch + 1) % tc.log_every == 0 and last is not None:
        rate = (step_in_epoch + 1 - first) * tc.batch_size / max(time.time() - t_epoch, 1e-9)
        left = (tc.epochs - epoch) * steps_per_epoch - step_in_epoch - 1
        log(f'epoch {epoch + 1}/{tc.epochs} step {step_in_epoch + 1}/{steps_per_epoch} '
            f'loss {float(last["loss"]):.4f} {rate:.1f} img/s '
            f'ETA {_hms(left * tc.batch_size / max(rate, 1e-9))}')
      if ckpt_lib.should_stop():
        avg.add(_checked(strategy.get_metrics(pending), host_step))
        save(epoch, step_in_epoch + 1, train_sums=avg.sums())
        log(f'interrupted: saved a checkpoint at epoch {epoch + 1}, step {step_in_epoch + 1}; '
            'run the same command again to resume')
        raise SystemExit(130)
    if pending is not None:
      avg.add(_checked(strategy.get_metrics(pending), host_step))
    train_time += time.time() - t_epoch - (compile_time if epoch == start_epoch else 0.0)
    val = evaluate(eval_step, strategy, state, ds, 'validation', tc.eval_batch_size)
    epoch_time = time.time() - t_epoch
    row = {'epoch': epoch + 1, **avg.result(), 'val_accuracy': val['accuracy'],
           'val_loss': val['loss'], 'val_top5': val['top5'],
           'lr': float(schedule(host_step)),
           'epoch_time_s': epoch_time,
           'images_per_s': (steps_per_epoch - first) * tc.batch_size / max(epoch_time, 1e-9)}
    history.append(row)
    _append_jsonl(metrics_path, row)
    writer.write_scalars(epoch + 1, {k: v for k, v in row.items() if k != 'epoch'})
    writer.flush()
    improved = val['accuracy'] > best_val
    if improved:
      best_val, best_epoch = val['accuracy'], epoch + 1
      best_state = strategy.get_state(state) if checkpoints is None else None
    save(epoch + 1, 0, val=val['accuracy'])
    log(f'epoch {epoch + 1}/{tc.epochs}: train_loss {row["train_loss"]:.4f} '
        f'train_acc {row["train_accuracy"]:.4f} val_loss {val["loss"]:.4f} '
        f'val_acc {val["accuracy"]:.4f}{"  (best)" if improved else ""}')

  if checkpoints is not None:
    restored = checkpoints.restore_best(strategy.get_state(state))
    best_state = restored[0] if restored is not None else strategy.get_state(state)
  test = evaluate(eval_step, strategy, strategy.put_state(best_state), ds, 'test',
                  tc.eval_batch_size)
  results = {
      'model': config.model.name, 'variant': config.get('variant', ''),
      'best_epoch': best_epoch, 'best_val_accuracy': best_val,
      'test_accuracy': test['accuracy'], 'test_top5': test['top5'], 'test_loss': test['loss'],
      'test_examples': test['count'], 'epochs': tc.epochs,
      'wall_time_s': time.time() - t_start, 'compile_time_s': compile_time,
      'train_images_per_s': train_images / max(train_time, 1e-9) if train_images else None,
      'devices': jax.device_count(), 'parallel': config.parallel, **counts,
  }
  _write_json(os.path.join(workdir, 'results.json'), results)
  if jax.process_index() == 0:
    plots.plot_curves(history, os.path.join(workdir, 'curves.png'),
                      title=f'{config.model.name} {config.get("variant", "")}')
  log(f'test accuracy (best epoch {best_epoch}): {test["accuracy"]:.4f}; '
      f'results in {os.path.join(workdir, "results.json")}')
  return results


def _metric_writer(workdir: str):
  """TensorBoard event files in `workdir` (clu), written by process 0 only."""
  from clu import metric_writers  # imports tensorflow: only after flowers_jax.data
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                              asynchronous=False)


def _checked(metrics: dict, step: int) -> dict:
  """Returns `metrics`, or stops the run if its loss is not finite (nothing is saved)."""
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'non-finite loss ({loss}) at step {step}; the run stopped without saving it and the last '
        'good checkpoint is kept. Try a lower optim.lr or optim.clip_norm=1.0')
  return metrics


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
