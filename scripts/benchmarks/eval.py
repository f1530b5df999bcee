"""Benchmark: inference (eval) steps/s of flowers_jax (float32, bfloat16) vs torchvision.

The JAX rows run the project's own eval step (`evaluators.make_eval_step`, compiled by
`parallel.make`: logits, top-1, top-5, loss); the torch rows the torchvision model in
`eval()` + `inference_mode` (float32; on CUDA also AMP bf16 + channels_last, `torch.compile`).
Synthetic in-memory batches, no tensorflow; FLOPs per image are 1x forward. See `_common.py`.

    python scripts/benchmark.py eval --models resnet18 --batch 8 --size 64 --steps 5
    python scripts/benchmark.py eval --batch 128 --size 224 --steps 20 --out eval.json
"""

from __future__ import annotations

from benchmarks import _common


def main(argv: list[str]) -> int:
  """Runs the benchmark with command-line `argv` (without the program name)."""
  return _common.main(argv, 'eval')
