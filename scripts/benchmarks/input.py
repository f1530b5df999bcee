r"""Benchmark: the input side of training: host pipeline, device augmentation, end to end.

  python scripts/benchmark.py input [--parts host,device,e2e --source-size 600x500
                                     --classes 10 --per-class 16 --size 224 --batch 32
                                     --images 256 --windows 3 --repeats 2 --cores 1,2
                                     --e2e-models resnet18,efficientnet_b0,vit_b16
                                     --e2e-size 64 --e2e-batch 16 --out input.json]
  python scripts/benchmark.py input --quick       # fewer images, repeats and steps

A synthetic Flowers102 look-alike of Flowers-sized JPEGs (`data.make_fake_flowers`,
`--source-size` WIDTHxHEIGHT, default 600x500 like the originals' ~500 px shorter side;
`--classes` x `--per-class` images, half of them train) is written to a temporary folder; then

  host    train images/s of `Dataset.train_stream` (tf.data: the decoded cache, `--pp-train`,
          default the base config's rrc_flip, at `--size` px, batch `--batch`), and of
          `Dataset.device_train_stream` (the device path's host half: the same random draws,
          no pixels), each in a subprocess pinned to the first N allowed cores
          (`os.sched_setaffinity`, `data.threads` = N) for N in `--cores`, the subprocesses
          in turns (1, 2, 1, 2, ...) `--repeats` times; per subprocess the median of
          `--windows` windows of `--images` images after 3 warm-up batches; the table gives
          the median over the repeats. The 16-core figure is 8 x the 2-core one: an
          ASSUMPTION (linear in cores from the 2-core figure), not a measurement; the measured
          1 -> 2 core scaling is printed beside it.
  device  the device path's augmentation (`device_pp.Augmenter` on `Dataset.device_cache`)
          on this process's default device (here: the CPU, both cores): images/s of
          `augmenter(strategy.put_batch(draws))` on batches drawn beforehand, blocked on the
          images, after a compile and a warm-up batch.
  e2e     per model (`configs/<model>.py`, random init, float32): the real loop
          (`train.train_and_evaluate`, host path, `--e2e-pp-train`) at `--e2e-size` px, batch
          `--e2e-batch`, against the same compiled train step on batches already on the
          device (`loop.bare`: synthetic-batch img/s, no input pipeline). End-to-end images/s
          is the last metrics.jsonl row's (steady: after warm-up; train time + input wait, 3
          validations per run); ratio = end to end / synthetic (1.0: the model bounds; below:
          the input or the loop does). On a 2-core CPU the model bounds; the GPU run shows
          where the input does.

Timings are reported, not asserted: this machine's cores are shared with other jobs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import loop as loop_bench

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/
PARTS = ('host', 'device', 'e2e')
STREAMS = {'host': 'train_stream', 'device_draws': 'device_train_stream'}
STREAM_LABELS = {'host': f'host path: tf.data decoded cache -> pixels ({STREAMS["host"]})',
                 'device_draws': f'device path, host half: draws only ({STREAMS["device_draws"]})'}
E2E_MODELS = ('resnet18', 'efficientnet_b0', 'vit_b16')
E2E_STEPS = {'resnet18': 24, 'efficientnet_b0': 24, 'vit_b16': 9}  # 3 validation windows
EXTRAPOLATE_CORES = 16
SCALES = 0.75  # 1 -> 2 core efficiency below which the table says the linear guess fails
WARMUP_BATCHES = 3
# Keys of each part's result that the tables print.
HOST_KEYS = ('stream', 'cores', 'images_per_s', 'repeats')
DEVICE_KEYS = ('images_per_s', 'ms_per_batch', 'cache_mib', 'device')
E2E_KEYS = ('model', 'e2e_images_per_s', 'synthetic_images_per_s', 'ratio',
            'input_wait_ms', 'host_overhead_ms', 'step_ms')


# ------------------------------------------------------------------------- the data ---


def make_data(root: str, args) -> str:
  """Flowers-sized JPEGs in the raw layout (half train, a quarter validation and test)."""
  from flowers_jax import data
  t = time.perf_counter()
  data.make_fake_flowers(root, num_classes=args.classes, per_class=args.per_class,
                         image_size=args.source_hw, seed=0, splits=(0.5, 0.25))
  print(f'  wrote {args.classes * args.per_class} JPEGs of {args.source_size} px in '
        f'{time.perf_counter() - t:.1f} s', flush=True)
  return root


def data_config(data_dir: str, size: int, threads: int, pp_train: str):
  from flowers_jax import config as config_lib
  cfg = config_lib.base_config().data
  cfg.update(dict(dir=data_dir, image_size=size, threads=threads, pp_train=pp_train,
                  on_device='host'))
  return cfg


# ------------------------------------------------------------------- host (pinned) ---


def pin(cores: int) -> list[int]:
  """This process on its first `cores` allowed CPUs (before TensorFlow starts); returns them."""
  cpus = sorted(os.sched_getaffinity(0))[:cores]
  os.sched_setaffinity(0, cpus)
  return cpus


def stream_rate(data_dir: str, stream: str, cores: int, size: int, batch: int, images: int,
                windows: int, pp_train: str) -> dict:
  """Images/s of `Dataset.<STREAMS[stream]>` pinned to `cores` CPUs (`data.threads` = cores):
  the median of `windows` windows of `images` images after `WARMUP_BATCHES` batches. Run in
  its own process (`pinned_rate`): the pinning and TensorFlow's thread pools are per process."""
  cpus = pin(cores)
  from flowers_jax import data
  ds = data.build(data_config(data_dir, size, cores, pp_train), seed=0)
  batches = getattr(ds, STREAMS[stream])(batch)  # builds the decoded / device cache first
  for _ in range(WARMUP_BATCHES):
    next(batches)
  rates = []
  for _ in range(windows):
    t = time.perf_counter()
    for _ in range(max(images // batch, 1)):
      next(batches)
    rates.append(max(images // batch, 1) * batch / (time.perf_counter() - t))
  return {'stream': stream, 'cores': cores, 'cpus': cpus, 'rates': rates,
          'images_per_s': statistics.median(rates)}


_WORKER = ('import json, os, sys; sys.path.insert(0, {here!r}); '
           'from benchmarks import input as m; r = m.stream_rate(**json.loads(sys.argv[1])); '
           'print(json.dumps(r), flush=True); os._exit(0)')  # no tf.data teardown at exit


def pinned_rate(**kwargs) -> dict:
  """`stream_rate(**kwargs)` in a fresh Python process; its result."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, '-c', _WORKER.format(here=HERE), json.dumps(kwargs)],
                        capture_output=True, text=True, env=env, timeout=600)
  if proc.returncode:
    raise RuntimeError(f'stream_rate{kwargs} failed: {proc.stderr.strip()[-2000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def host_rows(data_dir: str, args) -> list[dict]:
  """Per (stream, cores): the median over `args.repeats` pinned subprocesses, run in turns."""
  runs = {(s, c): [] for s in STREAMS for c in args.cores}
  for r in range(args.repeats):
    for stream, cores in runs:
      res = pinned_rate(data_dir=data_dir, stream=stream, cores=cores, size=args.size,
                        batch=args.batch, images=args.images, windows=args.windows,
                        pp_train=args.pp_train)
      runs[(stream, cores)].append(res['images_per_s'])
      print(f'  repeat {r}: {stream:<12} {cores} core(s) {res["images_per_s"]:8.1f} img/s',
            flush=True)
  return [{'stream': s, 'cores': c, 'images_per_s': statistics.median(v), 'repeats': v}
          for (s, c), v in runs.items()]


def host_table(rows: list[dict], args) -> str:
  """img/s per stream and core count, the 1 -> 2 scaling, and the 16-core extrapolation."""
  cores = sorted({r['cores'] for r in rows})
  rate = {(r['stream'], r['cores']): r['images_per_s'] for r in rows}
  lines = [f'Train input, {args.pp_train} at {args.size} px, batch {args.batch}, from '
           f'{args.source_size} px JPEGs (decoded cache), `data.threads` = cores, each in a '
           f'subprocess pinned with `sched_setaffinity`; median of {args.repeats} runs in '
           f'turns x median of {args.windows} windows of {args.images} images', '',
           '| stream | ' + ' | '.join(f'{c} core{"s" * (c > 1)} img/s' for c in cores) +
           ' | 2 cores / (2 x 1 core) | 16 cores img/s: ASSUMED 8 x 2-core (linear) |',
           '|---|' + '---:|' * (len(cores) + 2)]
  for stream in STREAMS:
    cells = [f'{rate[(stream, c)]:.0f}' for c in cores]
    two, one = rate.get((stream, 2)), rate.get((stream, 1))
    scaling = f'{two / (2 * one):.2f}' if two and one else '-'
    extra = f'{EXTRAPOLATE_CORES / 2 * two:.0f}' if two else '-'
    lines.append(f'| {STREAM_LABELS[stream]} | ' + ' | '.join(cells) +
                 f' | {scaling} | {extra} |')
  flat = [s for s in STREAMS if (s, 1) in rate and (s, 2) in rate
          and rate[(s, 2)] < SCALES * 2 * rate[(s, 1)]]
  lines += ['', 'The 16-core column ASSUMES throughput linear in cores from the 2-core figure; '
            'it is not measured.'] + [
      f'{STREAM_LABELS[s]}: measured 1 -> 2 cores scales by '
      f'{rate[(s, 2)] / (2 * rate[(s, 1)]):.2f}, below {SCALES}: it is not linear here, so '
      'its 16-core column overstates it.' for s in flat]
  return '\n'.join(lines)


# --------------------------------------------------------------------------- device ---


def device_rate(data_dir: str, args) -> dict:
  """Images/s of the device path's augmentation on the default device (see the docstring)."""
  import jax
  from flowers_jax import data, parallel
  from flowers_jax.data import device_pp, pp
  ds = data.build(data_config(data_dir, args.size, 0, args.pp_train), seed=0)
  strategy = parallel.make('sharded')
  cache = ds.device_cache('train')
  augmenter = device_pp.Augmenter(cache, pp.from_config(ds.config, 'pp_train'), strategy)
  draws = ds.device_train_stream(args.batch)
  host = [next(draws) for _ in range(args.device_batches + 1)]
  batches = [strategy.put_batch(b) for b in host]
  jax.block_until_ready(augmenter(batches[0])['image'])  # compile + one batch
  t = time.perf_counter()
  for b in batches[1:]:
    images = augmenter(b)['image']
  jax.block_until_ready(images)
  seconds = time.perf_counter() - t
  n = len(batches) - 1
  return {'images_per_s': n * args.batch / seconds, 'ms_per_batch': 1e3 * seconds / n,
          'cache_mib': cache.nbytes / 2 ** 20, 'device': jax.devices()[0].device_kind,
          'batches': n}


def device_not_available() -> None:
  """Where `flowers_jax/data/device_pp.py` or its Dataset methods are missing."""
  raise NotImplementedError('device path missing: flowers_jax/data/device_pp.py (Augmenter), '
                            'Dataset.device_cache and Dataset.device_train_stream')


def device_ready() -> bool:
  """Whether the device path exists (`device_pp.Augmenter`, the two `Dataset` methods)."""
  try:
    from flowers_jax.data import dataset, device_pp
  except ImportError:
    return False
  return hasattr(device_pp, 'Augmenter') and all(
      hasattr(dataset.Dataset, m) for m in ('device_cache', 'device_train_stream'))


def device_table(r: dict, args) -> str:
  return '\n'.join([
      f'Device-path augmentation ({args.pp_train} at {args.size} px, batch {args.batch}) on '
      f'{r["device"]}, {r["batches"]} batches after a compile and a warm-up', '',
      '| | img/s | ms / batch | cache MiB (one copy per device) |', '|---|---:|---:|---:|',
      f'| device_pp.Augmenter on {r["device"]} | {r["images_per_s"]:.0f} | '
      f'{r["ms_per_batch"]:.1f} | {r["cache_mib"]:.0f} |'])


# ------------------------------------------------------------------------------ e2e ---


def e2e_config(model: str, data_dir: str, steps_: int, args):
  """configs/<model>.py (random init) at `args.e2e_size` px, batch `args.e2e_batch`,
  `steps_` steps, 3 validations, no checkpoints, input path `args.e2e_on_device`."""
  from flowers_jax import config as config_lib
  from flowers_jax import config_utils
  root = os.path.dirname(HERE)
  c = config_utils.load_config(os.path.join(root, 'configs', f'{model}.py'))
  return config_lib.override(c, {
      'model.num_classes': args.classes, 'data.dir': data_dir,
      'data.image_size': args.e2e_size, 'data.pp_train': args.e2e_pp_train,
      'data.on_device': args.e2e_on_device, 'train.steps': steps_,
      'train.batch_size': args.e2e_batch, 'train.eval_batch_size': args.e2e_batch,
      'train.checkpoint': False,
      'train.log_every': 1000, 'evals.every_steps': max(steps_ // 3, 1),
      'optim.warmup_steps': 0}, 'benchmark input')  # warmup: the recipes' exceed these runs


def e2e_measure(name: str, config, workdir: str) -> dict:
  """One model's row: the real loop's steady window (`config`: 3 validations) against its
  compiled step on batches on the device, for a third of the steps."""
  steps_ = config.train.steps
  real, bare = loop_bench.real_and_bare(config, workdir, bare_steps=max(steps_ // 3, 2))
  batch = config.train.batch_size
  e2e, synthetic = batch * real['steps_per_s'], batch * bare['steps_per_s']
  return {'model': name, 'steps': steps_, 'e2e_images_per_s': e2e,
          'synthetic_images_per_s': synthetic, 'ratio': e2e / synthetic,
          'input_wait_ms': real['steady_input_ms'], 'host_overhead_ms': real['steady_host_ms'],
          'step_ms': real['steady_step_ms'], 'synthetic_step_ms': bare['step_ms'],
          'compile_time_s': real['results']['compile_time_s']}


def e2e_row(model: str, data_dir: str, root: str, args) -> dict:
  """`e2e_measure` of configs/<model>.py `args.e2e_repeats` times: the medians, and each run."""
  steps_ = max(int(E2E_STEPS[model] * args.e2e_scale), 6)
  config = e2e_config(model, data_dir, steps_, args)
  runs = [e2e_measure(model, config, os.path.join(root, f'e2e_{model}_{r}'))
          for r in range(args.e2e_repeats)]
  numbers = [k for k, v in runs[0].items() if isinstance(v, float)]
  return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in numbers},
          'runs': runs}


def e2e_rows(data_dir: str, root: str, args) -> list[dict]:
  rows = []
  for model in args.e2e_models:
    rows.append(e2e_row(model, data_dir, root, args))
    r = rows[-1]
    print(f'  e2e {model:<16} {r["e2e_images_per_s"]:7.1f} img/s end to end, '
          f'{r["synthetic_images_per_s"]:7.1f} synthetic, ratio {r["ratio"]:.2f} '
          f'(compile {r["compile_time_s"]:.0f} s)', flush=True)
  return rows


def e2e_table(rows: list[dict], args) -> str:
  lines = [f'End to end (the real loop, {args.e2e_on_device} path, {args.e2e_pp_train} at '
           f'{args.e2e_size} px, '
           f'batch {args.e2e_batch}, float32, random init; the last of 3 validation windows) '
           'against synthetic batches (the same compiled step on batches on the device); '
           'medians over the runs', '',
           '| model | steps x runs | e2e img/s | synthetic img/s | e2e / synthetic | ms / step | '
           'input_wait ms / step | host_overhead ms / step |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    runs = len(r.get('runs', [r]))
    lines.append(f'| {r["model"]} | {r["steps"]} x {runs} | {r["e2e_images_per_s"]:.1f} | '
                 f'{r["synthetic_images_per_s"]:.1f} | {r["ratio"]:.2f} | {r["step_ms"]:.0f} |'
                 f' {r["input_wait_ms"]:.1f} | {r["host_overhead_ms"]:.1f} |')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- report ---


def environment() -> dict:
  import jax
  import tensorflow as tf
  from benchmarks import _common
  return {'date': datetime.date.today().isoformat(), 'python': platform.python_version(),
          'jax': jax.__version__, 'tensorflow': tf.__version__,
          'device': jax.devices()[0].device_kind, 'cpu': _common.cpu_model(),
          'cores': len(os.sched_getaffinity(0)), 'load_avg': round(os.getloadavg()[0], 2)}


def _size(text: str) -> tuple[int, int]:
  """'WIDTHxHEIGHT' -> (height, width), as scripts/make_fake_flowers.py reads it."""
  width, height = (int(v) for v in text.lower().split('x'))
  return height, width


def _csv(valid: tuple[str, ...]):
  def parse(text: str) -> list[str]:
    items = [s.strip() for s in text.split(',') if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
      raise argparse.ArgumentTypeError(f'unknown {bad or text!r}; valid: {",".join(valid)}')
    return items
  return parse


def parse(argv: list[str]) -> argparse.Namespace:
  from flowers_jax.config import BASE
  p = argparse.ArgumentParser(prog='benchmark.py input', description=__doc__.split('\n')[0])
  p.add_argument('--parts', type=_csv(PARTS), default=list(PARTS))
  p.add_argument('--source-size', default='600x500', help='JPEG WIDTHxHEIGHT')
  p.add_argument('--classes', type=int, default=10)
  p.add_argument('--per-class', type=int, default=16, help='images per class (half train)')
  p.add_argument('--size', type=int, default=224, help='host / device part: crop px')
  p.add_argument('--batch', type=int, default=32, help='host / device part: batch')
  p.add_argument('--pp-train', default=BASE['data']['pp_train'])
  p.add_argument('--images', type=int, default=256, help='images per timed window')
  p.add_argument('--windows', type=int, default=3, help='timed windows per subprocess')
  p.add_argument('--repeats', type=int, default=2, help='pinned subprocesses per setting')
  p.add_argument('--cores', type=lambda t: [int(v) for v in t.split(',')], default=[1, 2])
  p.add_argument('--device-batches', type=int, default=4, help='timed augmentation batches')
  p.add_argument('--e2e-models', type=_csv(E2E_MODELS), default=list(E2E_MODELS))
  p.add_argument('--e2e-size', type=int, default=64)
  p.add_argument('--e2e-batch', type=int, default=16)
  p.add_argument('--e2e-pp-train', default=BASE['data']['pp_train'])
  p.add_argument('--e2e-on-device', choices=('host', 'device'), default='host',
                 help='data.on_device of the end-to-end runs')
  p.add_argument('--e2e-scale', type=float, default=1.0, help='x the steps of E2E_STEPS')
  p.add_argument('--e2e-repeats', type=int, default=1, help='runs per model (medians)')
  p.add_argument('--quick', action='store_true', help='fewer images, repeats and steps')
  p.add_argument('--out', type=Path, help='write the tables (.md) and the numbers (.json)')
  args = p.parse_args(argv)
  if args.quick:
    args.images, args.windows, args.repeats, args.device_batches = 96, 2, 1, 2
    args.e2e_scale = 0.5
  args.source_hw = _size(args.source_size)
  return args


def run_all(args, root: str) -> tuple[dict, str]:
  """(the numbers, the markdown) of `args.parts`."""
  env = environment()
  head = (f'{env["device"]} ({env["cpu"]}, {env["cores"]} cores, shared: load '
          f'{env["load_avg"]} at the start), python {env["python"]}, jax {env["jax"]}, '
          f'tensorflow {env["tensorflow"]}, {env["date"]}')
  data_dir = make_data(os.path.join(root, 'data'), args)
  result, texts = {'env': env}, [head]
  if 'host' in args.parts:
    result['host'] = host_rows(data_dir, args)
    texts.append(host_table(result['host'], args))
  if 'device' in args.parts:
    if not device_ready():
      device_not_available()
    result['device'] = device_rate(data_dir, args)
    texts.append(device_table(result['device'], args))
  if 'e2e' in args.parts:
    result['e2e'] = e2e_rows(data_dir, root, args)
    texts.append(e2e_table(result['e2e'], args))
  return result, '\n\n'.join(texts)


def main(argv: list[str]) -> int:
  args = parse(argv)
  print(f'input: parts {",".join(args.parts)}', flush=True)
  with tempfile.TemporaryDirectory() as root:
    result, text = run_all(args, root)
  print('\n' + text)
  from benchmarks import _common
  _common.write_outputs(args.out, args, text, result=result)
  return 0
