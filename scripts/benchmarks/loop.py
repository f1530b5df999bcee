r"""Benchmark: the training loop's own cost per step, with a model whose step costs ~0 ms.

  python scripts/benchmark.py loop [--steps 300 --rows 3 --batch 8 --size 16 --repeats 3
                                    --pp-train none --on-device host --log-every 10
                                    --profile 0 --out loop.json]
  python scripts/benchmark.py loop --quick        # 60 steps, 1 repeat

A trivial model, `_null` (`NullModel`: the mean of the image over its pixels, [B, 3], and a
Dense head to the classes: no BatchNorm, ~0 FLOPs), is registered for the benchmark only
(`null_model()`). Its train step is run three ways, in turns (each repeat runs all three), so
that a change in the machine's load hits all alike:

  real tf.data  `train.train_and_evaluate` itself: the base config, `--steps` steps of `--batch`
                images of `--size` px from a 4-class synthetic set (`data.make_fake_flowers`,
                24 train images of 20 px), input `--on-device` ('host': tf.data, `--pp-train`),
                checkpoints off, `--rows` validations (metrics.jsonl rows) evenly spaced.
  real memory   the same, with the run's train stream (`Dataset.train_stream`, or
                `device_train_stream`) replaced by its first 8 batches cycled
                (`in_memory_input`): the loop's own cost without tf.data making batches.
  bare          the in-memory run's own compiled train step (`run.train_step`, captured from
                `train._build`: the same program, no new compile) called `--steps` times in a
                Python for loop on batches already on the device, blocked once at the end.

The loop's accounting (train.py): `train_time` (the steps after the compiled first one) =
`device_wait` (blocked reading a step's metrics) + `host_overhead` (the host's own work);
`input_wait` (blocked in `next()` of the input: tf.data's batch, `_with_stop_flag` and
`put_batch`, the host -> device copy) is outside train_time. Per step, two readings:
  run     results.json totals / (steps - 1): the whole run, with its one-off costs (building
          the tf.data stream is host overhead, its first batch input wait, the first
          validation's eager lr-schedule ops and metric writer too);
  steady  the last metrics.jsonl row / its steps: a window after warm-up (this is what a long
          run pays per step).
real - bare (steady, train + input wait per step) is what the loop adds to a step beyond the
step call itself; the issue's bound is 1 ms. `breakdown` times the loop's parts in one more
real run by wrapping them (the loop's code unchanged; the wrappers cost ~1 us each): tf.data's
next batch, put_batch, the step call (dispatch), get_metrics, the check and the averages, the
progress line, the device augmentation's call (`--on-device device`), and the rest (the
step-to-step time minus those: `_with_stop_flag`, the prefetch generator, the loop's own
lines). `--profile N` adds cProfile's N costliest functions of one run. Timings are reported,
not asserted: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import datetime
import io
import itertools
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

NULL_MODEL = '_null'
NUM_CLASSES = 4
SOURCE_SIZE = 20  # px of the synthetic JPEGs
MEMORY_BATCHES = 8  # host batches the in-memory input cycles through
INPUTS = ('tf.data', 'memory')
STREAMS = ('train_stream', 'device_train_stream')  # the loop's input: host / device path
# The timed parts of `breakdown`, in the loop's order.
PARTS = ('tf.data next batch', 'put_batch (host -> device)', 'train_step call (dispatch)',
         'get_metrics (device -> host)', '_checked + Averager.add', '_log_progress',
         'device_pp augment call (on_device=device)')
# Keys of `measure`'s result that `table` prints.
RESULT_KEYS = tuple(f'{i}_{k}' for i in ('tfdata', 'memory') for k in (
    'steps_per_s', 'steady_step_ms', 'steady_host_ms', 'steady_input_ms', 'steady_device_ms',
    'run_host_ms', 'run_input_ms', 'run_device_ms', 'minus_bare_ms')) + (
    'bare_steps_per_s', 'bare_step_ms')


# ------------------------------------------------------------------------ the model ---


def _null_module():
  import flax.linen as nn
  import jax.numpy as jnp

  class NullModel(nn.Module):
    """images [B, H, W, 3] -> (logits [B, num_classes], {'pre_logits': [B, 3]}), float32.

    The mean over the pixels and one Dense layer: a step of ~0 ms whose params, optimizer
    state and metrics have the structure of a real model's, for timing what surrounds the step.
    """
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, bn_train: bool | None = None):
      del train, bn_train
      pooled = jnp.mean(x.astype(self.dtype), axis=(1, 2))
      logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(pooled)
      return logits.astype(jnp.float32), {'pre_logits': pooled.astype(jnp.float32)}

  return NullModel


@contextlib.contextmanager
def null_model():
  """Registers `_null` for the duration of the block; yields its name.

  Also lets `config_checks` accept it: its `model.name` rule holds the list of names taken
  when it was imported, so the rule is swapped for one that also accepts `_null` and put back
  on exit, as the registry entry is taken out again (`registry` has no unregister).
  """
  import jax.numpy as jnp
  from flowers_jax import config_checks, models
  from flowers_jax.models import registry
  module = _null_module()

  @models.register(NULL_MODEL, head=r'^head/')
  def null_model_factory(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32,
                         remat=False):
    del bn_axis_name, remat
    return module(num_classes=num_classes, dtype=dtype)

  rules = config_checks.RULES
  config_checks.RULES = tuple(_accepting(rule, NULL_MODEL) for rule in rules)
  try:
    yield NULL_MODEL
  finally:
    config_checks.RULES = rules
    registry._MODELS.pop(NULL_MODEL, None)
    registry.HEAD_PATTERNS.pop(NULL_MODEL, None)


def _accepting(rule, name: str):
  """`rule`, or for `model.name` the same rule that also accepts `name`."""
  if rule.key != 'model.name':
    return rule
  ok = rule.ok
  return dataclasses.replace(rule, ok=lambda v, c: v == name or ok(v, c))


# ---------------------------------------------------------------- config and input ---


def make_data(root: str) -> str:
  """The 4-class synthetic set (24 train, 12 validation, 12 test images of 20 px) in `root`."""
  from flowers_jax import data
  data.make_fake_flowers(root, num_classes=NUM_CLASSES, per_class=12, image_size=SOURCE_SIZE,
                         seed=0, splits=(0.5, 0.25))
  return root


def loop_config(data_dir: str, args):
  """The base config with the null model (inside `null_model()`), `args`' sizes, no
  checkpoints, `args.rows` validations evenly spaced (the last after the last step)."""
  from flowers_jax import config as config_lib
  c = config_lib.base_config()
  c.model.name = NULL_MODEL
  c.model.num_classes = NUM_CLASSES
  c.data.update(dict(dir=data_dir, image_size=args.size, pp_train=args.pp_train,
                     on_device=args.on_device))
  c.train.update(dict(steps=args.steps, batch_size=args.batch, eval_batch_size=args.batch,
                      checkpoint=False, log_every=args.log_every))
  c.evals.every_steps = max(args.steps // args.rows, 1)
  return c


@contextlib.contextmanager
def in_memory_input(count: int = MEMORY_BATCHES):
  """The train streams of `Dataset` (`STREAMS`) replaced by their first `count` host batches,
  cycled, in the block: the loop then pays its own per-step cost only (`_with_stop_flag`,
  `put_batch`, ...), without tf.data making batches on the same cores."""
  from flowers_jax.data import dataset
  real = {name: getattr(dataset.Dataset, name) for name in STREAMS}

  def cycled(make):
    def stream(self, *args, **kwargs):
      batches = make(self, *args, **kwargs)
      return itertools.cycle([next(batches) for _ in range(count)])
    return stream

  for name, make in real.items():
    setattr(dataset.Dataset, name, cycled(make))
  try:
    yield
  finally:
    for name, make in real.items():
      setattr(dataset.Dataset, name, make)


# --------------------------------------------------------------------- the real loop ---


def _read_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def per_step(results: dict, rows: list[dict], batch: int) -> dict:
  """The real loop's figures per step, ms: over the whole run (results.json totals / timed
  steps, every step but the compiled first) and steady (the last metrics row / its steps).

  results: results.json of a run with `train.accum_steps=1`; rows: its metrics.jsonl.
  """
  n = max(results['steps'] - 1, 1)
  run = {k: 1e3 * results[f'{k}_s'] / n
         for k in ('train_time', 'host_overhead', 'input_wait', 'device_wait')}
  last = rows[-1]
  window = last['step'] - (rows[-2]['step'] if len(rows) > 1 else 1)
  train = 1e3 * window * batch / last['images_per_s'] / window
  host, wait = 1e3 * last['host_overhead_s'] / window, 1e3 * last['input_wait_s'] / window
  return {'timed_steps': n, 'run_host_ms': run['host_overhead'], 'run_input_ms':
          run['input_wait'], 'run_device_ms': run['device_wait'],
          'run_step_ms': run['train_time'] + run['input_wait'], 'window': window,
          'steady_host_ms': host, 'steady_input_ms': wait, 'steady_device_ms': train - host,
          'steady_step_ms': train + wait, 'steps_per_s': 1e3 / (train + wait)}


def run_real(config, workdir: str, quiet: bool = True) -> dict:
  """`train.train_and_evaluate(config, workdir)`: its results.json and `per_step` figures."""
  from flowers_jax import train
  with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
    results = train.train_and_evaluate(config, workdir)
  return {'results': results, **per_step(results, _read_rows(workdir),
                                         config.train.batch_size)}


# --------------------------------------------------------------------- the bare loop ---


@contextlib.contextmanager
def captured_build():
  """Yields a dict that receives `run` and `state` (the host TrainState before training) of
  the `train._build` calls in the block: the real loop's compiled train step, for `bare`."""
  from flowers_jax import train
  build, built = train._build, {}

  def capturing(*args, **kwargs):
    built['run'], built['state'] = build(*args, **kwargs)
    return built['run'], built['state']

  train._build = capturing
  try:
    yield built
  finally:
    train._build = build


def _device_batches(run, count: int) -> list[dict]:
  """`count` host batches of the run's train stream, with a zero `stop`, on the devices."""
  import numpy as np
  stream = run.ds.train_stream(run.config.train.batch_size)
  host = [next(stream) for _ in range(count)]
  return [run.strategy.put_batch({**b, 'stop': np.zeros(b['label'].shape, np.float32)})
          for b in host]


def bare(run, host_state, steps_: int, warmup: int = 2) -> dict:
  """`run.train_step` (compiled by the real loop: same program, no new compile) called
  `steps_` times in a Python loop on batches already on the devices, from `host_state`;
  blocked once at the end. ms per step and steps/s."""
  import jax
  state = run.strategy.put_state(host_state)
  batches = _device_batches(run, MEMORY_BATCHES)
  for i in range(warmup):
    state, metrics = run.train_step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(steps_):
    state, metrics = run.train_step(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics))
  ms = 1e3 * (time.perf_counter() - t0) / steps_
  return {'step_ms': ms, 'steps_per_s': 1e3 / ms}


def real_and_bare(config, workdir: str, source: str = 'tf.data', bare_steps: int = 0
                  ) -> tuple[dict, dict | None]:
  """A real run (`source` input), then `bare_steps` bare steps of its compiled step (0: none)."""
  with captured_build() as built:
    with in_memory_input() if source == 'memory' else contextlib.nullcontext():
      real = run_real(config, workdir)
  if not bare_steps:
    return real, None
  return real, bare(built['run'], built['state'], bare_steps)


# --------------------------------------------------------------------------- measure ---


def measure(args, root: str) -> dict:
  """Real (tf.data, memory) and bare runs in turns, `args.repeats` times: `RESULT_KEYS`
  (medians over the repeats) and every run. Call inside `null_model()`."""
  config = loop_config(make_data(os.path.join(root, 'data')), args)
  runs = {'tfdata': [], 'memory': [], 'bare': []}
  for r in range(args.repeats):  # the bare loop after the in-memory run, with its step
    for name, source in zip(('tfdata', 'memory'), INPUTS):
      real, bare_ = real_and_bare(config, os.path.join(root, f'{name}{r}'), source,
                                  args.steps if source == 'memory' else 0)
      real.pop('results')
      runs[name].append(real)
    runs['bare'].append(bare_)
    print(f'  repeat {r}: ' + ', '.join(
        f'{k} {v[-1]["steps_per_s"]:.0f} steps/s' for k, v in runs.items()), flush=True)
  med = lambda rows, key: statistics.median(row[key] for row in rows)
  out = {'bare_steps_per_s': med(runs['bare'], 'steps_per_s'),
         'bare_step_ms': med(runs['bare'], 'step_ms')}
  for name in ('tfdata', 'memory'):
    for key in runs[name][0]:
      out[f'{name}_{key}'] = med(runs[name], key)
    out[f'{name}_minus_bare_ms'] = statistics.median(
        a['steady_step_ms'] - b['step_ms'] for a, b in zip(runs[name], runs['bare']))
  return {**out, 'runs': runs}


# ------------------------------------------------------------------------- breakdown ---


class _Parts:
  """Seconds per part per step: `add(part, s)` charges the step in progress."""

  def __init__(self):
    self.step, self.calls = 0, {p: {} for p in PARTS}
    self.starts: list[float] = []

  def add(self, part: str, seconds: float) -> None:
    self.calls[part][self.step] = self.calls[part].get(self.step, 0.0) + seconds

  def timed(self, part: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.add(part, time.perf_counter() - t)
    return wrapper

  def stepped(self, fn: Callable) -> Callable:
    """`fn` (the train step) timed, each call starting a new step."""
    timed = self.timed(PARTS[2], fn)

    def wrapper(*args):
      self.step += 1
      self.starts.append(time.perf_counter())
      return timed(*args)
    return wrapper

  def iterator(self, it):
    while True:
      t = time.perf_counter()
      try:
        item = next(it)
      except StopIteration:
        return
      self.add(PARTS[0], time.perf_counter() - t)
      yield item


def _timed_stream(parts: _Parts, make: Callable) -> Callable:
  return lambda *args, **kwargs: parts.iterator(make(*args, **kwargs))


@contextlib.contextmanager
def _instrumented(parts: _Parts):
  """The loop's parts wrapped with timers (train._build's run, train's helpers)."""
  from flowers_jax import train
  build, checked, add, progress = (train._build, train._checked, train.Averager.add,
                                   train._log_progress)

  def timed_build(*args, **kwargs):
    run, state = build(*args, **kwargs)
    run.train_step = parts.stepped(run.train_step)
    run.strategy.put_batch = parts.timed(PARTS[1], run.strategy.put_batch)
    run.strategy.get_metrics = parts.timed(PARTS[3], run.strategy.get_metrics)
    if run.augment is not None:
      run.augment = parts.timed(PARTS[6], run.augment)
    for name in STREAMS:
      setattr(run.ds, name, _timed_stream(parts, getattr(run.ds, name)))
    return run, state

  train._build = timed_build
  train._checked = parts.timed(PARTS[4], checked)
  train.Averager.add = parts.timed(PARTS[4], add)
  train._log_progress = parts.timed(PARTS[5], progress)
  try:
    yield
  finally:
    train._build, train._checked, train.Averager.add = build, checked, add
    train._log_progress = progress


def breakdown(args, root: str, source: str = 'tf.data') -> dict:
  """One real run with its parts timed: {part: (median us, mean us) per step} over the steps
  after the compiled first, with 'step to step' and 'rest' (step to step minus the parts).

  The step-to-step time leaves out the validations' steps (their eval is not the loop's).
  """
  config = loop_config(make_data(os.path.join(root, 'data')), args)
  parts = _Parts()
  with _instrumented(parts):
    real_and_bare(config, os.path.join(root, f'breakdown_{source}'), source)
  steps_ = range(2, len(parts.starts))  # step k runs from start k-1 to start k
  every = config.evals.every_steps
  steps_ = [k for k in steps_ if k % every]
  total = {k: parts.starts[k] - parts.starts[k - 1] for k in steps_}
  per = {p: [parts.calls[p].get(k, 0.0) for k in steps_] for p in PARTS}
  per['step to step'] = [total[k] for k in steps_]
  per['rest'] = [total[k] - sum(parts.calls[p].get(k, 0.0) for p in PARTS) for k in steps_]
  return {p: (1e6 * statistics.median(v), 1e6 * statistics.mean(v)) for p, v in per.items()}


def breakdown_table(parts: dict, source: str) -> str:
  lines = [f'Loop parts per step, one real run ({source} input), us (median / mean over the '
           'steps after the first, validation steps left out)', '',
           '| part | median us | mean us |', '|---|---:|---:|']
  lines += [f'| {p} | {m:.0f} | {a:.0f} |' for p, (m, a) in parts.items()]
  return '\n'.join(lines)


def profile(args, root: str, top: int) -> str:
  """One real run (tf.data input) under cProfile: the `top` functions by own time."""
  config = loop_config(make_data(os.path.join(root, 'data')), args)
  prof = cProfile.Profile()
  prof.enable()
  run_real(config, os.path.join(root, 'profiled'))
  prof.disable()
  out = io.StringIO()
  pstats.Stats(prof, stream=out).sort_stats('tottime').print_stats(top)
  return (f'cProfile of one real run ({args.steps} steps, with build, eval and test; '
          f'cProfile slows Python ~2x), by own time:\n\n```\n{out.getvalue().strip()}\n```')


# --------------------------------------------------------------------------- report ---


def environment() -> dict:
  import flax
  import jax
  from benchmarks import _common
  return {'date': datetime.date.today().isoformat(), 'python': platform.python_version(),
          'jax': jax.__version__, 'flax': flax.__version__,
          'device': jax.devices()[0].device_kind, 'cpu': _common.cpu_model(),
          'cores': len(os.sched_getaffinity(0)), 'load_avg': round(os.getloadavg()[0], 2)}


def table(r: dict, args, env: dict) -> str:
  """The markdown table of `measure`'s medians (`RESULT_KEYS`)."""
  head = (f'Loop overhead, null model (`_null`, a ~0 ms step), batch {args.batch}, {args.size} '
          f'px, {args.steps} steps, {args.rows} validations, on_device={args.on_device}, '
          f'pp_train={args.pp_train}, log_every={args.log_every}; median of {args.repeats} '
          f'repeats, the three runs in turns; {env["device"]} ({env["cpu"]}, {env["cores"]} '
          f'cores, load {env["load_avg"]}), jax {env["jax"]}, flax {env["flax"]}, {env["date"]}')
  rows = [('steps/s (steady: train + input wait)', 'steps_per_s', '.0f'),
          ('ms / step, steady (train + input wait)', 'steady_step_ms', '.3f'),
          ('  host_overhead / step, ms', 'steady_host_ms', '.3f'),
          ('  input_wait / step, ms', 'steady_input_ms', '.3f'),
          ('  device_wait / step, ms', 'steady_device_ms', '.3f'),
          ('whole run (results.json / steps): host_overhead, ms', 'run_host_ms', '.3f'),
          ('whole run: input_wait, ms', 'run_input_ms', '.3f'),
          ('whole run: device_wait, ms', 'run_device_ms', '.3f'),
          ('**real - bare, ms / step (steady; bound <= 1 ms)**', 'minus_bare_ms', '.3f')]
  lines = [head, '', '| | real, tf.data input | real, in-memory input | bare jitted loop |',
           '|---|---:|---:|---:|']
  bare = {'steps_per_s': f'{r["bare_steps_per_s"]:.0f}',
          'steady_step_ms': f'{r["bare_step_ms"]:.3f}'}
  for label, key, spec in rows:
    cells = [format(r[f'{i}_{key}'], spec) for i in ('tfdata', 'memory')]
    lines.append(f'| {label} | {cells[0]} | {cells[1]} | {bare.get(key, "")} |')
  return '\n'.join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='benchmark.py loop', description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=300, help='train steps per run')
  p.add_argument('--rows', type=int, default=3, help='validations (metrics rows) per run')
  p.add_argument('--batch', type=int, default=8, help='global batch')
  p.add_argument('--size', type=int, default=16, help='image size, px')
  p.add_argument('--repeats', type=int, default=3, help='rounds of the three runs')
  p.add_argument('--pp-train', default='none', help='config.data.pp_train of the real loop')
  p.add_argument('--on-device', default='host', choices=('host', 'device'),
                 help='config.data.on_device of the real loop')
  p.add_argument('--log-every', type=int, default=10, help='config.train.log_every')
  p.add_argument('--no-breakdown', action='store_true', help='skip the timed parts')
  p.add_argument('--profile', type=int, default=0, metavar='N',
                 help='also profile one real run; print the N costliest functions')
  p.add_argument('--quick', action='store_true', help='60 steps, 1 repeat')
  p.add_argument('--out', type=Path, help='write the tables (.md) and the numbers (.json)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.repeats = 60, 1
  if args.rows < 2 or args.steps < 4 * args.rows:
    p.error('--rows must be >= 2 and --steps >= 4 x --rows (the last row is the steady one)')
  return args


def run_all(args, root: str) -> tuple[dict, str]:
  """(the numbers, the markdown) of every part `args` asks for. Call inside `null_model()`."""
  env = environment()
  result = {'env': env, **measure(args, root)}
  text = table(result, args, env)
  if not args.no_breakdown:
    result['breakdown'] = {s: breakdown(args, root, s) for s in INPUTS}
    text += ''.join('\n\n' + breakdown_table(result['breakdown'][s], s) for s in INPUTS)
  if args.profile:
    text += '\n\n' + profile(args, root, args.profile)
  return result, text


def main(argv: list[str]) -> int:
  args = parse(argv)
  print('loop: ' + ', '.join(f'{k} {v}' for k, v in environment().items()), flush=True)
  with tempfile.TemporaryDirectory() as root, null_model():
    result, text = run_all(args, root)
  print('\n' + text)
  from benchmarks import _common
  _common.write_outputs(args.out, args, text, result=result)
  return 0
