r"""Benchmark: XLA buffer sizes of the ViT-B/16 train step, plain / accumulation / remat.

  python scripts/benchmark.py memory [--batch 512 --sizes 224,384 --accum 8 --dtype bfloat16
                                      --time-size 32 --time-batch 8 --time-steps 5
                                      --out memory.md]

Part 1, memory (nothing is allocated: the step is lowered from `jax.ShapeDtypeStruct`s and
compiled for the default backend, `jax.jit(step, donate_argnums=0).lower(...).compile()`):
the project's own train step (`steps.make_train_step`: forward, backward, the base config's
optimizer from `optim.make_optimizer`, SGD momentum 0.9 with weight decay) for ViT-B/16 in
`--dtype` at `--batch` images of each of `--sizes`, three ways:
  plain     one step on the whole batch;
  accum N   the step on a microbatch of batch / N images with `optax.MultiSteps(tx, N)`
            (`steps.accumulating`): the same optimizer step after N calls, its state holding
            one more gradient-sized buffer (the accumulator), counted in argument/output;
  remat     the model with `remat=True` (activation checkpointing per encoder block).
Columns (GiB) are XLA's `memory_analysis()`: argument, output, alias (donated argument bytes
reused for outputs), temp (everything else the program allocates: activations, gradients,
workspaces), generated code; peak = argument + output + temp - alias, XLA's own plan of the
step's live bytes (not the process RSS; fragmentation and the runtime come on top). `saved`
is what the JAX program keeps from the forward for the backward pass besides the params
themselves (the residuals of the loss's VJP that are computed: activations and the bf16 copies
of the weights; `_saved_bytes`): what remat changes, independent of the backend.

XLA:CPU does not honour remat's memory saving: its pipeline expands `jax.checkpoint`'s
CSE-foiling optimization barriers (`OptimizationBarrierExpander` in
`RunHloPassesThroughLayoutAssn`) before its later CSE and scheduling passes, so part of the
recomputation is merged back into the forward pass (ResNet-18's all of it; ViT-B/16's compiled
gradient keeps 375 matmuls against 291) and the rest is not held back to the backward pass.
XLA:GPU expands the barriers only after scheduling. On CPU the remat row's `temp` is
therefore no smaller (the `saved` column shows what remat is meant to save); run this on the
GPU for the real numbers.

Part 2, step time on the default device at a small size (`--time-size` px, `--time-batch`
images, `--time-dtype`): the median over `--time-steps` optimizer steps after the compile and
one warm-up, of plain, remat and accumulation over `--accum` microbatches (one optimizer step
= `--accum` calls of the step on batch / accum images), timed in turns, as ms per optimizer
step and as ratios to plain (on CPU the remat step does recompute the ViT's matmuls, see
above).
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import numpy as np

from benchmarks import _common

MODEL = 'vit_b16'
GIB = 2 ** 30


def _csv_ints(text: str) -> list[int]:
  return [int(s) for s in text.split(',') if s.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='benchmark.py memory', description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=512, help='global batch of the memory rows')
  p.add_argument('--sizes', type=_csv_ints, default=[224, 384], help='image sizes, px')
  p.add_argument('--accum', type=int, default=8, help='microbatches per optimizer step')
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                 help='compute dtype of the memory rows')
  p.add_argument('--variants', default='plain,accum,remat',
                 help='comma-separated subset of plain,accum,remat')
  p.add_argument('--time-size', type=int, default=32, help='image size of the timed steps')
  p.add_argument('--time-batch', type=int, default=8)
  p.add_argument('--time-steps', type=int, default=5, help='timed optimizer steps (median)')
  p.add_argument('--time-dtype', default='float32', choices=('bfloat16', 'float32'))
  p.add_argument('--no-time', action='store_true', help='skip the step-time part')
  p.add_argument('--out', type=Path, help='write the tables (.md) and the rows (.json) here')
  args = p.parse_args(argv)
  args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  bad = set(args.variants) - {'plain', 'accum', 'remat'}
  if bad:
    p.error(f'unknown variants {sorted(bad)}')
  if args.batch % args.accum or args.time_batch % args.accum:
    p.error(f'--batch and --time-batch must be multiples of --accum {args.accum}')
  return args


def _train_cfg(accum: int) -> types.SimpleNamespace:
  """The base config's `train` (flowers_jax.config.BASE) with `accum_steps`."""
  cfg = _common.base_namespace().train
  cfg.accum_steps = accum
  return cfg


def _setup(size: int, dtype: str, remat: bool, accum: int, concrete: bool):
  """(model, tx, state, step) for ViT-B/16 at `size` px; state abstract unless `concrete`."""
  import jax
  import jax.numpy as jnp
  from flowers_jax import models, optim, steps

  model = models.create(MODEL, num_classes=_common.NUM_CLASSES, dtype=getattr(jnp, dtype),
                        image_size=size, remat=remat)
  config = _common.base_namespace()
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  init = lambda x: model.init(jax.random.key(0), x, train=False)
  variables = (jax.jit(init)(jnp.zeros(x.shape, x.dtype)) if concrete else
               jax.eval_shape(init, x))
  spec = models.spec(MODEL)
  tx = optim.make_optimizer(config.optim, variables['params'], total_steps=1000,
                            freeze=config.train.freeze, head_pattern=spec.head,
                            no_decay=spec.no_weight_decay, model_name=MODEL)
  tx = steps.accumulating(tx, accum, variables['params'])
  create = lambda v: steps.TrainState.create(v, tx, seed=config.seed)
  state = create(variables) if concrete else jax.eval_shape(create, variables)
  step = steps.make_train_step(model, tx, _train_cfg(accum), axis_name=None)
  return model, tx, state, step


def _abstract_batch(batch: int, size: int) -> dict:
  import jax
  import jax.numpy as jnp
  return {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32),
          'mask': jax.ShapeDtypeStruct((batch,), jnp.float32)}


def _saved_bytes(model, params, batch: dict) -> int:
  """Bytes the forward keeps for the backward pass of the cross-entropy, besides the arguments.

  jax's `saved_residuals` (what `jax.ad_checkpoint.print_saved_residuals` prints) tells the
  residuals that are the params themselves (no extra memory: they are arguments of the step)
  from the computed ones (activations, bf16 copies of the weights); without it (a jax where
  that private function moved) all the residuals of `jax.vjp` are counted.
  """
  import jax
  import optax

  def loss(p, batch):
    logits, _ = model.apply({'params': p}, batch['image'], train=True,
                            rngs={'dropout': jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  nbytes = lambda a: int(np.prod(a.shape)) * a.dtype.itemsize
  try:
    from jax._src.ad_checkpoint import saved_residuals
  except ImportError:
    residuals = jax.eval_shape(lambda p, b: jax.vjp(lambda p: loss(p, b), p)[1], params, batch)
    return sum(nbytes(a) for a in jax.tree.leaves(residuals))
  return sum(nbytes(a) for a, what in saved_residuals(loss, params, batch)
             if not what.startswith('from the argument'))


def memory_row(size: int, variant: str, args) -> dict:
  import jax

  accum = args.accum if variant == 'accum' else 1
  micro = args.batch // accum
  label = f'accum {accum}' if variant == 'accum' else variant
  model, _, state, step = _setup(size, args.dtype, variant == 'remat', accum, concrete=False)
  batch = _abstract_batch(micro, size)
  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  arg, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
  temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
  return dict(size=size, variant=label, microbatch=micro, argument=arg, output=out,
              alias=alias, temp=temp, code=code, peak=arg + out + temp - alias,
              saved=_saved_bytes(model, state.params, batch), lower_s=t1 - t0,
              compile_s=t2 - t1, platform=jax.devices()[0].platform)


def memory_table(rows: list[dict], args) -> str:
  g = lambda b, spec='.3f': format(b / GIB, spec)
  lines = [f'ViT-B/16 {args.dtype} train step (forward + backward + SGD momentum update), '
           f'global batch {args.batch}, XLA memory_analysis on {rows[0]["platform"]} (GiB)', '',
           '| px | variant | microbatch | argument | output | alias | temp | code | '
           'peak = arg+out+temp-alias | saved | peak / plain | lower s | '
           'compile s |',
           '|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    plain = next((p for p in rows if p['size'] == r['size'] and p['variant'] == 'plain'), None)
    ratio = f'{r["peak"] / plain["peak"]:.2f}' if plain else '-'
    lines.append(f'| {r["size"]} | {r["variant"]} | {r["microbatch"]} | {g(r["argument"])} | '
                 f'{g(r["output"])} | {g(r["alias"])} | {g(r["temp"])} | '
                 f'{g(r["code"], ".4f")} | {g(r["peak"])} | {g(r["saved"])} | {ratio} | '
                 f'{r["lower_s"]:.1f} | {r["compile_s"]:.1f} |')
  return '\n'.join(lines)


def _timed_step(args, remat: bool, calls: int):
  """(run(state) -> state: one optimizer step of `calls` calls, state, compile s)."""
  import jax

  size, micro = args.time_size, args.time_batch // calls
  _, _, state, step = _setup(size, args.time_dtype, remat, calls, concrete=True)
  batch = _common.synthetic_batch(micro, size)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0

  def run(state):
    for _ in range(calls):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return state
  return run, state, compile_s


def time_rows(args) -> list[dict]:
  """ms per optimizer step of plain, remat and accumulation at the small size.

  The three are compiled first, then timed in turns (plain, remat, accum, plain, ...), so
  that a change in the machine's load (other jobs on a shared CPU) hits all three alike.
  """
  import warnings

  plan = (('plain', False, 1), ('remat', True, 1), (f'accum {args.accum}', False, args.accum))
  runs, states, rows = [], [], []
  for label, remat, calls in plan:
    run, state, compile_s = _timed_step(args, remat, calls)
    runs.append(run)
    states.append(state)
    rows.append(dict(variant=label, microbatch=args.time_batch // calls, calls=calls,
                     compile_s=compile_s, times_ms=[]))
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='.*donated buffers were not usable.*')
    for i in range(1 + args.time_steps):  # the first round is the warm-up
      for j, run in enumerate(runs):
        t = time.perf_counter()
        states[j] = run(states[j])
        if i:
          rows[j]['times_ms'].append(1e3 * (time.perf_counter() - t))
  for r in rows:
    r['ms'] = statistics.median(r['times_ms'])
    print(f'  timed {r["variant"]:<8} {r["ms"]:8.1f} ms / optimizer step', flush=True)
  return rows


def time_table(rows: list[dict], args) -> str:
  import jax
  plain = rows[0]['ms']
  lines = [f'ViT-B/16 {args.time_dtype} train step time on {jax.devices()[0].device_kind}, '
           f'{args.time_size} px, {args.time_batch} images per optimizer step, median of '
           f'{args.time_steps} steps after one warm-up, the three in turns', '',
           '| variant | microbatch x calls | ms / optimizer step | vs plain | compile s |',
           '|---|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["variant"]} | {r["microbatch"]} x {r["calls"]} | {r["ms"]:.1f} | '
                 f'{r["ms"] / plain:.2f} | {r["compile_s"]:.1f} |')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  """Runs the benchmark with command-line `argv` (without the program name)."""
  args = parse(argv)
  _common.ensure_ml_collections()
  import jax
  print(f'memory: jax {jax.__version__}, {jax.devices()[0].device_kind}, '
        f'cores {len(__import__("os").sched_getaffinity(0))}', flush=True)
  t_start = time.perf_counter()
  rows = []
  for size in args.sizes:
    for variant in args.variants:
      rows.append(memory_row(size, variant, args))
      r = rows[-1]
      print(f'  {size} px {r["variant"]:<8} peak {r["peak"] / GIB:7.3f} GiB  temp '
            f'{r["temp"] / GIB:7.3f} GiB  lower {r["lower_s"]:.1f} s  compile '
            f'{r["compile_s"]:.1f} s', flush=True)
  text = memory_table(rows, args)
  timed = [] if args.no_time else time_rows(args)
  if timed:
    text += '\n\n' + time_table(timed, args)
  text += f'\n\ntotal {time.perf_counter() - t_start:.0f} s'
  print('\n' + text)
  _common.write_outputs(args.out, args, text, memory=rows, time=timed)
  return 0
