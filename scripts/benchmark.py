r"""Benchmarks, one per subcommand, each a module in scripts/benchmarks/ with `main(argv)`.

  python scripts/benchmark.py deform [--batch 32 --size 112 --out deform.json]
  python scripts/benchmark.py data   [--image-size 224]
  python scripts/benchmark.py --list

Timings are reported side by side as ratios (JAX vs the PyTorch reference), not asserted in tests.
"""

import importlib
import os
import pkgutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules([os.path.join(HERE, 'benchmarks')]))


def main(argv: list[str]) -> int:
  names = available()
  if len(argv) < 2 or argv[1] in ('-h', '--help', '--list'):
    print(__doc__ + '\navailable: ' + ', '.join(names))
    return 0
  name = argv[1]
  if name not in names:
    print(f'error: unknown benchmark {name!r}; available: {", ".join(names)}', file=sys.stderr)
    return 2
  sys.path.insert(0, HERE)
  sys.path.insert(0, os.path.dirname(HERE))
  module = importlib.import_module(f'benchmarks.{name}')
  return module.main(argv[2:]) or 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
