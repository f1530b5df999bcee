"""The one rule for the dtype that outputs, losses and metrics compute in.

A run's `model.dtype` (float32 or bfloat16) is the dtype of the convolutions and matmuls. What
comes out of a model (logits, pre-logits), the BatchNorm statistics, the losses and the metrics
are computed in `compute_dtype(dtype) = promote_types(dtype, float32)`:

- float32 for float32 and bfloat16 runs (a bfloat16 loss or softmax would lose the digits that
  small gradients live in);
- float64 for float64 ones, which only the equality tests use (`jax.enable_x64`): there every
  value down to the loss and its gradient is float64, so two code paths that add the same
  numbers in other orders agree to ~1e-14, and a real difference cannot hide under float32 noise.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def compute_dtype(dtype: Any) -> jnp.dtype:
  """float32 for float32 / bfloat16 / integer dtypes, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def promote(x) -> jnp.ndarray:
  """`x` cast to `compute_dtype(x.dtype)` (float32 [..] for bfloat16, unchanged for float32/64)."""
  x = jnp.asarray(x)
  return x.astype(compute_dtype(x.dtype))
