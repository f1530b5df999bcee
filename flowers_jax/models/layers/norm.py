"""BatchNorm with torch's numerics, and the per-model partial that builds it.

`flax.linen.BatchNorm` differs from `torch.nn.BatchNorm2d` in training mode in two ways that
matter for a port:

- torch updates `running_var` with the *unbiased* batch variance (n / (n - 1)); Flax with the
  biased one. On small maps (ResNet18's layer4 at 32 px is 1x1, n = B) the running variance is
  then off by B / (B - 1) after every step.
- Flax's default `use_fast_variance=True` computes E[x^2] - E[x]^2, which loses digits when a
  channel's mean is large against its std; torch uses two passes (mean, then E[(x - mean)^2]).

This `BatchNorm` normalises with the biased two-pass variance and updates the running variance
with the unbiased one, like torch. Its variables have Flax's names (`params/scale`, `bias`;
`batch_stats/mean`, `var`), so converted torchvision weights load unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowers_jax.precision import compute_dtype


def _stats_dtype(x: jnp.ndarray):
  """float32 for float32 / bfloat16 inputs, float64 for float64 ones (`precision.py`)."""
  return compute_dtype(x.dtype)


class BatchNorm(nn.Module):
  """torch `BatchNorm2d` over the last axis of `x [..., C]`.

  Attributes:
    use_running_average: True: normalise with the running statistics (torch `eval()`);
      False: with the batch's, and update the running ones (torch `train()`).
    momentum: Flax convention, `running = momentum * running + (1 - momentum) * batch`
      (torch momentum 0.1 is 0.9 here).
    epsilon: added to the variance (torch eps).
    dtype: output dtype; statistics are computed in float32 (float64 for float64 input).
    axis_name: pmap axis over which batch statistics are averaged (None under jit, where the
      batch is one global array).
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var, n = self._batch_moments(x)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
    dtype = self.dtype or x.dtype
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(_stats_dtype(x)) - mean) * mul + bias
    return y.astype(dtype)

  def _batch_moments(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, int]:
    """Mean and biased variance over every axis but the last, in two passes; n rows."""
    axes = tuple(range(x.ndim - 1))
    x = x.astype(_stats_dtype(x))
    n = math.prod(x.shape[:-1])
    mean = jnp.mean(x, axes)
    if self.axis_name:
      mean = jax.lax.pmean(mean, self.axis_name)
      n *= jax.lax.psum(1, self.axis_name)
    var = jnp.mean(jnp.square(x - mean), axes)
    if self.axis_name:
      var = jax.lax.pmean(var, self.axis_name)
    return mean, var, n


def torch_batchnorm(*, running: bool, axis_name: str | None, dtype: Any,
                    epsilon: float = 1e-5) -> functools.partial:
  """The BatchNorm partial a model passes to its blocks (torch momentum 0.1, eps 1e-5)."""
  return functools.partial(BatchNorm, use_running_average=running, momentum=0.9,
                           epsilon=epsilon, dtype=dtype, axis_name=axis_name)
