"""Writes a synthetic Flowers102 look-alike in the raw Oxford layout.

  python scripts/make_fake_flowers.py OUT_DIR --num-classes 10 --per-class 24 \
      --image-size 96 --seed 0 [--splits 0.5,0.25,0.25]

``--image-size`` is an int (square) or WIDTHxHEIGHT (e.g. 500x400). The result
is read by ``config.data.source='folder'``, ``config.data.dir=OUT_DIR``.
"""

import argparse

from flowers_jax.data.fake import make_fake_flowers


def _size(text):
  if 'x' in text:
    width, height = (int(v) for v in text.split('x'))
    return height, width
  return int(text)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out_dir')
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--per-class', type=int, default=24)
  parser.add_argument('--image-size', type=_size, default=96)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--splits', default='0.5,0.25,0.25',
                      help='fractions of each class for train,validation[,test]')
  args = parser.parse_args(argv)
  counts = make_fake_flowers(args.out_dir, args.num_classes, args.per_class,
                             args.image_size, args.seed,
                             [float(v) for v in args.splits.split(',')])
  print(f'wrote {sum(counts.values())} images of {args.num_classes} classes to'
        f' {args.out_dir}: ' + ', '.join(f'{k} {v}' for k, v in counts.items()))


if __name__ == '__main__':
  main()
