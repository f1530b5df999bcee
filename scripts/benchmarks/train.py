"""Benchmark: training steps/s of flowers_jax (float32, bfloat16) vs torchvision, per model.

The JAX rows run the project's own train step (`steps.make_train_step`, compiled by
`parallel.make`, SGD from `optim.make_optimizer`); the torch rows the torchvision model with
SGD (float32; on CUDA also AMP bfloat16 + channels_last, and `torch.compile`). Synthetic
in-memory batches, no tensorflow. See `_common.py` for what each column measures.

    python scripts/benchmark.py train --models resnet18 --batch 8 --size 64 --steps 5
    python scripts/benchmark.py train --batch 128 --size 224 --steps 20 --out train.json
"""

from __future__ import annotations

from benchmarks import _common


def main(argv: list[str]) -> int:
  """Runs the benchmark with command-line `argv` (without the program name)."""
  return _common.main(argv, 'train')
