"""Dropout and stochastic depth whose randomness belongs to the global batch.

`flax.linen.Dropout` draws one mask per device: under `pmap` every device gets its own key
(or the same key for different rows), so the numbers depend on the device count and differ
from a jit run on one global array. Here the mask is drawn for the *global* batch with one key
(the same on every device) and each device keeps its rows, so dropout and stochastic depth give
the same numbers on one device, under sharded jit and under pmap on any device count.

Under pmap each device draws the whole global mask and slices it; for the layers that use this
(EfficientNet's classifier dropout [B, 1280], stochastic depth [B], ViT's dropout when enabled)
that costs a few microseconds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_bernoulli(rng: jax.Array, keep: float, shape: tuple[int, ...],
                    axis_name: str | None) -> jnp.ndarray:
  """Bool mask of `shape` = this device's rows `[b, ...]` of one mask drawn for the global batch.

  With `axis_name` None (jit over a global array, or one device) `shape` is the global shape.
  Under pmap, devices hold consecutive row blocks in axis_index order, as `parallel.Pmap` and
  the data pipeline lay them out.
  """
  if not axis_name:
    return jax.random.bernoulli(rng, keep, shape)
  n = jax.lax.psum(1, axis_name)
  full = jax.random.bernoulli(rng, keep, (n * shape[0], *shape[1:]))
  start = jax.lax.axis_index(axis_name) * shape[0]
  return jax.lax.dynamic_slice_in_dim(full, start, shape[0], axis=0)


class Dropout(nn.Module):
  """`nn.Dropout` with a batch-global mask (rng stream 'dropout'). [B, ...] -> [B, ...]."""
  rate: float
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    if keep == 0.0:
      return jnp.zeros_like(x)
    mask = batch_bernoulli(self.make_rng('dropout'), keep, x.shape, self.axis_name)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def stochastic_depth(x: jnp.ndarray, rate: float, rng: jax.Array | None,
                     axis_name: str | None = None) -> jnp.ndarray:
  """torchvision `stochastic_depth(mode='row')`: zero whole examples of `x` [B, ...].

  Each example survives with probability 1 - rate and survivors are scaled by 1 / (1 - rate);
  `rng` None (evaluation) or rate 0 returns `x` unchanged.
  """
  if rng is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  if keep == 0.0:
    return jnp.zeros_like(x)
  mask = batch_bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1), axis_name)
  return x * (mask.astype(x.dtype) / keep)
