"""Input-pipeline throughput: train (and eval) images/s at 224 px on the fake set.

  python scripts/benchmark.py data [--dir DIR] [--image-size 224] [--batch 64]
      [--epochs 3] [--threads 0] [--no-cache] [--sampler random] [--pp-train rrc_flip]

Without ``--dir`` a fake Flowers102 set of 500x400 JPEGs (102 classes x 12: 1020 train,
204 validation images) is written to a temporary folder first. Epoch 0 (and eval
pass 0) include filling the in-memory caches; later ones are the steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from flowers_jax import config as config_lib
from flowers_jax import data


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--dir', default='', help='a folder-layout set; default: generate one')
  p.add_argument('--source', default='folder')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--epochs', type=int, default=3)
  p.add_argument('--threads', type=int, default=0, help='0 = AUTOTUNE')
  p.add_argument('--no-cache', action='store_true')
  p.add_argument('--sampler', default='random', choices=['random', 'triplet', 'pk'])
  p.add_argument('--pp-train', default=config_lib.base_config().data.pp_train,
                 help="config.data.pp_train: a preset or ops joined by '|' (data/pp.py)")
  p.add_argument('--per-class', type=int, default=12, help='generated set: 102 x this')
  return p.parse_args(argv)


def _rate(make_batches, batch_size):
  t = time.perf_counter()
  n = sum(1 for _ in make_batches())
  dt = time.perf_counter() - t
  return n * batch_size / dt, n


def run(args) -> dict:
  tmp = None
  root = args.dir
  if not root:
    tmp = tempfile.TemporaryDirectory()
    root = tmp.name
    t = time.perf_counter()
    data.make_fake_flowers(root, num_classes=102, per_class=args.per_class,
                           image_size=(400, 500), seed=0, splits=(0.84, 0.16))
    print(f'generated {102 * args.per_class} 500x400 JPEGs in {time.perf_counter() - t:.1f} s',
          flush=True)
  cfg = config_lib.base_config().data
  cfg.update(dict(source=args.source, dir=root, image_size=args.image_size,
                  pp_train=args.pp_train, threads=args.threads, cache=not args.no_cache))
  t = time.perf_counter()
  ds = data.build(cfg, seed=0, process_index=0, process_count=1)
  result = {'build_s': round(time.perf_counter() - t, 2), 'image_size': args.image_size,
            'batch': args.batch, 'cache': not args.no_cache, 'sampler': args.sampler,
            'pp_train': args.pp_train,
            'threads': args.threads or f'AUTOTUNE ({os.cpu_count()} CPUs)',
            'num_train': ds.num_examples['train'], 'train_images_per_s': []}
  for epoch in range(args.epochs):
    rate, steps = _rate(lambda e=epoch: ds.train_batches(args.batch, e, sampler=args.sampler),
                        args.batch)
    result['train_images_per_s'].append(round(rate, 1))
    print(f'epoch {epoch}: {steps} steps, {rate:.1f} train images/s', flush=True)
  for i in range(2):
    rate, _ = _rate(lambda: ds.eval_batches('validation', args.batch), args.batch)
    result[f'eval_images_per_s_pass{i}'] = round(rate, 1)
  if tmp is not None:
    tmp.cleanup()
  return result


def main(argv=None) -> int:
  print(json.dumps(run(_parse(argv))))
  return 0


if __name__ == '__main__':
  main(sys.argv[1:])
