"""Benchmark: the project's train step under `parallel='pmap'` against `parallel='sharded'`.

    python scripts/benchmark.py parallel [--models resnet18,vit_b16 --devices 4 --batch 8
                                          --size 32 --steps 10 --repeats 3 --out parallel.json]

Both strategies compile the same `steps.make_train_step` (float32, the base config's SGD) on
the same synthetic global batch, on `--devices` devices: on a CPU-only machine these are fake
host devices (`--xla_force_host_platform_device_count`, set here before jax starts), which is
where the tests run the parallel code. The two modes alternate `--repeats` times (pmap,
sharded, pmap, ...), each time a fresh state and compile, so that a change in the machine's
load hits both; the table gives each mode's median ms/step over the repeats and the ratio
sharded / pmap (< 1: sharded faster). Timings are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks import _common

MODES = ('pmap', 'sharded')


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='benchmark.py parallel',
                              description='train ms/step under pmap and sharded, side by side')
  p.add_argument('--models', type=_common._csv(tuple(_common.MODELS), 'model'),
                 default=['resnet18', 'vit_b16'])
  p.add_argument('--devices', type=int, default=4,
                 help='devices to run on; on CPU, this many fake host devices')
  p.add_argument('--batch', type=int, default=8, help='global batch size')
  p.add_argument('--size', type=int, default=32, help='image height = width')
  p.add_argument('--steps', type=int, default=10, help='timed steps per run')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after the first')
  p.add_argument('--repeats', type=int, default=3, help='runs per mode, alternating')
  p.add_argument('--out', type=Path, help='write environment and rows as JSON here')
  args = p.parse_args(argv)
  if args.devices < 1 or args.batch % args.devices:
    p.error(f'--batch {args.batch} must split evenly over --devices {args.devices}')
  # What _common.bench_jax reads besides the above.
  args.mode, args.frameworks, args.dtypes = 'train', ['jax'], ['float32']
  return args


def _set_devices(n: int) -> None:
  """Asks XLA for `n` host devices; only has an effect before jax is imported."""
  if 'jax' in sys.modules:
    raise RuntimeError('benchmark.py parallel must set XLA_FLAGS before jax is imported')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])


def run(args) -> list[dict]:
  rows = []
  for name in args.models:
    for repeat in range(args.repeats):
      for mode in MODES:
        args.parallel = mode
        r = _common.bench_jax(args, name, 'float32')
        r.update(repeat=repeat, parallel=mode)
        rows.append(r)
        print(f'  {name:<16} {mode:<8} run {repeat}: {r["ms_per_step"]:8.1f} ms/step, '
              f'compile {r["compile_s"]:5.1f} s', flush=True)
  return rows


def table(rows: list[dict], args) -> str:
  lines = [f'train step, float32, batch {args.batch}, {args.size}x{args.size} px, '
           f'{args.devices} devices, median of {args.repeats} runs x {args.steps} steps',
           f'{"model":<16} {"pmap ms":>9} {"sharded ms":>11} {"sharded/pmap":>13}']
  for name in dict.fromkeys(r['model'] for r in rows):
    ms = {m: statistics.median(r['ms_per_step'] for r in rows
                               if r['model'] == name and r['parallel'] == m) for m in MODES}
    lines.append(f'{name:<16} {ms["pmap"]:>9.1f} {ms["sharded"]:>11.1f} '
                 f'{ms["sharded"] / ms["pmap"]:>13.2f}')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  args = parse(argv)
  _set_devices(args.devices)
  _common.ensure_ml_collections()
  import jax
  if jax.device_count() < args.devices:
    print(f'error: {args.devices} devices asked, {jax.device_count()} present', file=sys.stderr)
    return 2
  env = _common.environment(args)
  print('parallel: ' + ', '.join(f'{k} {v}' for k, v in env.items()), flush=True)
  rows = run(args)
  env['load_avg_end'] = os.getloadavg()[0]
  print(table(rows, args))
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({'config': config, 'env': env, 'results': rows},
                                   indent=2) + '\n')
  return 0
