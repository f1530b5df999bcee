"""Benchmark: flowers_jax deform_conv2d (jitted) vs torchvision.ops.deform_conv2d.

Times forward and forward+backward (gradients w.r.t. input, offset, kernel, bias and,
with --mask, the mask) on the shape of the deformable conv after ResNet18's conv1
(batch 32, 64 -> 64 channels, 112x112, 3x3, padding 1), on the default JAX backend and
on CUDA for torch where available, CPU otherwise. Reports ms per iteration, the ratio
JAX / torch, and peak memory:
  jax    compiled.memory_analysis() temp bytes of the fwd+bwd step (scratch XLA
         allocates besides arguments and outputs), and on GPU the device's
         peak_bytes_in_use;
  torch  torch.cuda.max_memory_allocated() on GPU; on CPU the growth of the process's
         max RSS during the torch run (torch's CPU allocator is invisible to
         tracemalloc), measured before JAX runs.

    python scripts/benchmark.py deform --batch 4 --size 56 --out deform.json
    python scripts/benchmarks/deform.py --batch 32 --size 112
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _parse(argv):
  p = argparse.ArgumentParser(prog='benchmark.py deform', description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--size', type=int, default=112, help='input height = width')
  p.add_argument('--channels', type=int, default=64, help='input = output channels')
  p.add_argument('--kernel', type=int, default=3)
  p.add_argument('--offset-groups', type=int, default=1)
  p.add_argument('--mask', action='store_true', help='DCNv2 modulation mask')
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--skip-torch', action='store_true')
  p.add_argument('--out', type=Path, help='write the results as JSON here')
  return p.parse_args(argv)


def _operands(args):
  """Random float32 operands in torch layout (NCHW / OIHW)."""
  rng = np.random.default_rng(0)
  b, c, s, k, g = args.batch, args.channels, args.size, args.kernel, args.offset_groups
  f32 = lambda a: a.astype(np.float32)
  return dict(
      x=f32(rng.normal(size=(b, c, s, s))),
      offset=f32(rng.uniform(-2, 2, (b, 2 * g * k * k, s, s))),
      weight=f32(rng.normal(size=(c, c, k, k)) / np.sqrt(c * k * k)),
      bias=f32(rng.normal(size=(c,))),
      mask=f32(rng.uniform(0, 1, (b, g * k * k, s, s))) if args.mask else None,
      cotangent=f32(rng.normal(size=(b, c, s, s))))


def _time(fn, iters, warmup):
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters * 1e3


def bench_torch(args, ops):
  import torch
  import torchvision

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  t = {k: None if v is None else torch.tensor(v, device=device) for k, v in ops.items()}
  leaves = [t[k].requires_grad_() for k in ('x', 'offset', 'weight', 'bias', 'mask')
            if t[k] is not None]
  pad = args.kernel // 2

  def forward():
    return torchvision.ops.deform_conv2d(t['x'], t['offset'], t['weight'], t['bias'],
                                         padding=pad, mask=t['mask'])

  def fwd():
    with torch.no_grad():
      forward()
    sync()

  def fwd_bwd():
    for leaf in leaves:
      leaf.grad = None
    forward().backward(t['cotangent'])
    sync()

  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  fwd_bwd()
  peak = (torch.cuda.max_memory_allocated() if device == 'cuda' else
          (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024)
  return dict(impl='torchvision', device=device, fwd_ms=_time(fwd, args.iters, args.warmup),
              fwd_bwd_ms=_time(fwd_bwd, args.iters, args.warmup), peak_bytes=peak,
              peak_kind='cuda max_memory_allocated' if device == 'cuda' else
              'max RSS growth (upper bound)')


def bench_jax(args, ops):
  import jax
  import jax.numpy as jnp

  from flowers_jax.models.layers.deform import deform_conv2d

  layout = {'x': (0, 2, 3, 1), 'offset': (0, 2, 3, 1), 'mask': (0, 2, 3, 1),
            'weight': (2, 3, 1, 0), 'bias': (0,), 'cotangent': (0, 2, 3, 1)}
  j = {k: None if v is None else jnp.asarray(v.transpose(layout[k])) for k, v in ops.items()}
  pad = args.kernel // 2

  def conv(x, offset, kernel, bias, mask):
    return deform_conv2d(x, offset, kernel, bias, mask, padding=pad)

  def loss(operands, cotangent):
    return jnp.vdot(conv(*operands), cotangent)

  operands = tuple(j[k] for k in ('x', 'offset', 'weight', 'bias', 'mask'))
  fwd_jit = jax.jit(conv)
  grad_jit = jax.jit(jax.grad(loss))
  compiled = grad_jit.lower(operands, j['cotangent']).compile()
  analysis = compiled.memory_analysis()
  temp = getattr(analysis, 'temp_size_in_bytes', None) if analysis is not None else None

  fwd = lambda: fwd_jit(*operands).block_until_ready()
  fwd_bwd = lambda: jax.block_until_ready(compiled(operands, j['cotangent']))
  result = dict(impl='flowers_jax', device=str(jax.devices()[0].platform),
                fwd_ms=_time(fwd, args.iters, args.warmup),
                fwd_bwd_ms=_time(fwd_bwd, args.iters, args.warmup),
                peak_bytes=temp, peak_kind='XLA temp bytes (fwd+bwd)')
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    result['device_peak_bytes'] = stats['peak_bytes_in_use']
  return result


def _table(rows, args):
  columns_mib = (args.batch * args.size ** 2 * args.kernel ** 2 * args.channels * 4) / 2**20
  lines = [f'deform_conv2d B={args.batch} C={args.channels} {args.size}x{args.size} '
           f'k={args.kernel} mask={args.mask}  (im2col columns: {columns_mib:.0f} MiB)',
           f'{"impl":<12} {"device":<6} {"fwd ms":>9} {"fwd+bwd ms":>11} {"peak MiB":>9}  kind']
  for r in rows:
    peak = '-' if r['peak_bytes'] is None else f'{r["peak_bytes"] / 2**20:.0f}'
    lines.append(f'{r["impl"]:<12} {r["device"]:<6} {r["fwd_ms"]:>9.2f} '
                 f'{r["fwd_bwd_ms"]:>11.2f} {peak:>9}  {r["peak_kind"]}')
  if len(rows) == 2:
    jx, tv = rows[1], rows[0]
    lines.append(f'ratio jax/torch: fwd {jx["fwd_ms"] / tv["fwd_ms"]:.2f}, '
                 f'fwd+bwd {jx["fwd_bwd_ms"] / tv["fwd_bwd_ms"]:.2f}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  """Runs the benchmark with command-line `argv` (without the program name); returns 0."""
  args = _parse(argv)
  ops = _operands(args)
  rows = [] if args.skip_torch else [bench_torch(args, ops)]  # before JAX: see max RSS
  rows.append(bench_jax(args, ops))
  print(_table(rows, args))
  if args.out:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({'config': config, 'results': rows}, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
