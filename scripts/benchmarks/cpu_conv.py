"""XLA CPU: time of a 3x3 / 512-channel conv (ResNet18's last stage) by feature-map size.

  python scripts/benchmark.py cpu_conv [--batch 32]

On the CPU backend of jax 0.10 the 2x2 map (ResNet18 fed 33-64 px images) is ~20x slower than
the 3x3 one, which is why the CPU demo trains at 32 px. Prints ms per conv for maps 1..4.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, *args, iters=3) -> float:
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def main(argv):
  ap = argparse.ArgumentParser(prog='benchmark.py cpu_conv')
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--channels', type=int, default=512)
  a = ap.parse_args(argv)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 3, a.channels, a.channels)), jnp.float32)
  rows = []
  for size in (1, 2, 3, 4):
    x = jnp.asarray(rng.normal(size=(a.batch, size, size, a.channels)), jnp.float32)
    rows.append({'map': f'{size}x{size}', 'ms': round(1e3 * _time(conv, x, w), 2)})
  print(f'{jax.devices()[0].platform}: 3x3 conv, {a.channels} channels, batch {a.batch}')
  for r in rows:
    print(f"  {r['map']:>4}: {r['ms']:8.2f} ms")
  print(json.dumps(rows))
  return 0
