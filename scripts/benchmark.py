r"""Benchmarks, one per subcommand, each a module in scripts/benchmarks/ with `main(argv)`.

  python scripts/benchmark.py train  [--models resnet18,vit_b16 --batch 8 --size 64 --steps 5
                                      --dtypes float32,bfloat16 --out train.json]
  python scripts/benchmark.py eval   [same options: inference steps]
  python scripts/benchmark.py deform [--batch 32 --size 112 --out deform.json]
  python scripts/benchmark.py data   [--image-size 224]
  python scripts/benchmark.py cpu_conv [--batch 32]
  python scripts/benchmark.py memory [--batch 512 --sizes 224,384 --accum 8 --out memory.md]
  python scripts/benchmark.py loop   [--quick --on-device device --profile N]   the loop's cost
  python scripts/benchmark.py input  [--parts host,device,e2e --quick]   host img/s, e2e ratio
  python scripts/benchmark.py device_input [--models resnet18 --batch 128 --size 224]  (no TF)
  python scripts/benchmark.py --list

`train` / `eval`: every model (resnet18, efficientnet_b0, vit_b16, resnet18 with each deform
placement) through the project's own step in JAX float32 / bfloat16 against torchvision
(float32; on CUDA AMP + channels_last and torch.compile), from in-memory synthetic batches,
without tensorflow. `make bench` runs them small on CPU; `scripts/gpu_bench.sh` is the GPU run
(batch 128, 224 px). Results go to docs/benchmarks.md.

Timings are reported side by side as ratios (JAX vs the PyTorch reference), not asserted in tests.
"""

import importlib
import os
import pkgutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules([os.path.join(HERE, 'benchmarks')])
                if not m.name.startswith('_'))  # _common: shared code, not a benchmark


def main(argv: list[str]) -> int:
  names = available()
  if len(argv) < 2 or argv[1] in ('-h', '--help', '--list'):
    print(__doc__ + '\navailable: ' + ', '.join(names))
    return 0
  name = argv[1]
  if name not in names:
    print(f'error: unknown benchmark {name!r}; available: {", ".join(names)}', file=sys.stderr)
    return 2
  module = importlib.import_module(f'benchmarks.{name}')
  return module.main(argv[2:]) or 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
