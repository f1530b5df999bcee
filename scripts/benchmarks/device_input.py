r"""The device input path end to end, without tensorflow (the GPU machine has none).

  python scripts/benchmark.py device_input [--models resnet18,efficientnet_b0 --batch 128
      --size 224 --images 512 --steps 20 --dtype bfloat16 --out device_input.json]

Flowers-sized JPEGs (--images of 500 x 500-750 px, smooth random colour fields, quality 90) are
decoded with PIL and shrunk to shorter side 2 x size (PIL bilinear, antialiased: what
`pipeline.cache_images` does in tf.data) into a `device_cache.DeviceCache`; the
`rrc_flip` preset then runs on the device (`device_pp.Augmenter`) from random-resized-crop
windows and flip bits drawn in numpy (torchvision's `get_params`; the training run draws the
same numbers in tf.data from its example seeds, which costs ~21k rows/s on 2 cores, and the
pixels and speed do not depend on which numbers they are). Per model:

  augment      img/s of the augmentation alone (device)
  synthetic    img/s of the train step on uint8 batches already on the device
  end to end   img/s of host draws -> put_batch -> augment -> train step, the loop's order
  ratio        end to end / synthetic: 1.0 means the input never bounds the step

The host path (tf.data) is measured by `benchmark.py input` where tensorflow is installed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time

import numpy as np

from benchmarks import _common

PRESET = 'rrc_flip'


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """`count` JPEGs of 500 x (500-750) px: smooth random colour fields (upsampled noise)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    w = int(rng.integers(500, 751))
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, 500), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def build_cache(jpegs: list[bytes], size: int):
  """(DeviceCache at shorter side 2 * size, decode + shrink img/s on one host core)."""
  from PIL import Image
  from flowers_jax.data import device_cache
  t0 = time.perf_counter()
  images, orig = [], []
  short_side = 2 * size
  for data in jpegs:
    im = Image.open(io.BytesIO(data)).convert('RGB')
    orig.append((im.height, im.width))
    scale = short_side / min(im.height, im.width)
    if scale < 1:
      im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    images.append(np.asarray(im))
  rate = len(jpegs) / (time.perf_counter() - t0)
  return device_cache.pack(images, orig, short_side, 'bilinear'), rate


def rrc_windows(rng, orig_hw: np.ndarray, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                tries: int = 10) -> np.ndarray:
  """torchvision `RandomResizedCrop.get_params` for each (H, W): int32 [N, 4] (top, left, h, w)."""
  out = np.zeros((len(orig_hw), 4), np.int32)
  for i, (height, width) in enumerate(orig_hw):
    area = height * width
    for _ in range(tries):
      target = area * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
      if 0 < w <= width and 0 < h <= height:
        out[i] = (rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w)
        break
    else:
      side = min(height, width)
      out[i] = ((height - side) // 2, (width - side) // 2, side, side)
  return out


def host_params(rng, cache, batch: int) -> dict:
  """One batch of `Dataset.device_train_stream`'s layout, drawn in numpy."""
  from flowers_jax.data import pp
  index = rng.integers(0, len(cache.orig_hw), batch).astype(np.int32)
  params = {'index': index, '0.window': rrc_windows(rng, cache.orig_hw[index]),
            '1.flip': rng.integers(0, 2, batch).astype(np.int32)}
  return {pp.PARAMS_KEY: {'image': params},
          'label': rng.integers(0, _common.NUM_CLASSES, batch).astype(np.int32),
          'mask': np.ones(batch, np.float32)}


def bench_model(args, name: str, cache, augmenter, strategy) -> dict:
  import jax
  setup = argparse.Namespace(**vars(args), mode='train', warmup=2)
  state, fn = _common._jax_setup(setup, name, args.dtype, strategy)
  state = strategy.put_state(state)
  rng = np.random.default_rng(0)
  first = augmenter(strategy.put_batch(host_params(rng, cache, args.batch)))
  box = [state]

  def synthetic():
    box[0], metrics = fn(box[0], first)
    return metrics

  def end_to_end():
    batch = augmenter(strategy.put_batch(host_params(rng, cache, args.batch)))
    box[0], metrics = fn(box[0], batch)
    return metrics

  def augment_only():
    return augmenter(strategy.put_batch(host_params(rng, cache, args.batch)))['image']

  rates = {}
  for label, step in (('augment', augment_only), ('synthetic', synthetic),
                      ('end_to_end', end_to_end)):
    _, ms = _common.time_steps(step, jax.block_until_ready, 2, args.steps)
    rates[label] = args.batch / (ms / 1e3)
  return {'model': name, 'dtype': args.dtype, **{f'{k}_img_per_s': v for k, v in rates.items()},
          'ratio': rates['end_to_end'] / rates['synthetic']}


def table(rows: list[dict], env: dict, args, cache_rate: float, nbytes: int) -> str:
  head = (f'{env.get("jax_device")} | jax {env.get("jax")} | batch {args.batch}, {args.size} px,'
          f' {args.dtype}; cache: {args.images} JPEGs, {nbytes / 2**20:.0f} MiB at shorter side '
          f'{2 * args.size}, built at {cache_rate:.0f} img/s (PIL, one core)')
  lines = [head, '', '| model | augment img/s | synthetic img/s | end to end img/s | ratio |',
           '|---|---:|---:|---:|---:|']
  lines += [f'| {r["model"]} | {r["augment_img_per_s"]:.0f} | {r["synthetic_img_per_s"]:.0f} |'
            f' {r["end_to_end_img_per_s"]:.0f} | {r["ratio"]:.2f} |' for r in rows]
  return '\n'.join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='benchmark.py device_input', description=__doc__.split('\n')[0])
  p.add_argument('--models', type=_common._csv(('resnet18', 'efficientnet_b0', 'vit_b16'),
                                               'model'), default=['resnet18', 'efficientnet_b0'])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--images', type=int, default=512, help='JPEGs in the device cache')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='bfloat16')
  p.add_argument('--parallel', choices=('sharded', 'pmap'), default='sharded')
  p.add_argument('--threads', type=int, default=0)
  p.add_argument('--out', help='write config, environment and rows as JSON here')
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  from flowers_jax import parallel
  from flowers_jax.data import device_pp, pp
  args = parse(argv)
  cache, cache_rate = build_cache(make_jpegs(args.images), args.size)
  cfg = argparse.Namespace(image_size=args.size, eval_resize=args.size, interpolation='bilinear')
  pipe = pp.parse(PRESET, cfg)
  strategy = parallel.make(args.parallel)
  augmenter = device_pp.Augmenter(cache, pipe, strategy)
  rows = [bench_model(args, name, cache, augmenter, strategy) for name in args.models]
  env = _common.environment(argparse.Namespace(frameworks=['jax']))
  print(table(rows, env, args, cache_rate, cache.nbytes))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'config': {**vars(args), 'mode': 'device_input'}, 'env': env, 'results': rows},
                f, indent=2)
  return 0
