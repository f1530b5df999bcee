"""Exponential moving average of params and BatchNorm statistics, as timm's `ModelEmaV3`.

timm (timm/utils/model_ema.py) `ModelEmaV3.update(model, step)` does, for every entry of the
state dict (parameters and buffers, e.g. BatchNorm running_mean / running_var):
  float tensors:  ema.lerp_(x, 1 - decay), i.e. ema = ema * decay + x * (1 - decay)
  other tensors:  ema = x (copied; e.g. num_batches_tracked)
with `get_decay(step)`:
  s = max(0, step - update_after_step - 1)
  s <= 0:       decay = 0 (the EMA is set to the weights; both step 0 and step 1 give 0)
  use_warmup:   decay = clip(1 - (1 + s / warmup_gamma) ** -warmup_power, min_decay, decay)
  otherwise:    decay = decay

timm's constructor defaults are decay=0.9999, min_decay=0, update_after_step=0,
use_warmup=False, warmup_gamma=1, warmup_power=2/3. We train with use_warmup=True (the default
of `decay_at` here): the decay ramps up from 0, so the early EMA follows the weights instead of
staying near the initialisation (with power 2/3 it reaches 0.999 at ~31.6k steps; power 3/4
at ~10k). timm's bfloat16 stochastic rounding is not reproduced: `update` computes in float32
(float64 for float64 leaves) and rounds to the leaf's dtype; keep the EMA in float32 for low
precision models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def decay_at(step, *, decay: float, warmup: bool = True, warmup_gamma: float = 1.0,
             warmup_power: float = 2 / 3, min_decay: float = 0.0,
             update_after_step: int = 0) -> Array:
  """timm `ModelEmaV3(decay=..., use_warmup=warmup, ...).get_decay(step)`, a scalar.

  step: int (traced or not). Returns the default float dtype (float32; float64 with x64).
  """
  dtype = jnp.result_type(float)
  s = jnp.maximum(0, jnp.asarray(step) - update_after_step - 1).astype(dtype)
  if warmup:
    d = 1 - (1 + s / warmup_gamma) ** -warmup_power
    d = jnp.maximum(jnp.minimum(d, decay), min_decay)
  else:
    d = jnp.full((), decay, dtype)
  return jnp.where(s <= 0, jnp.zeros((), dtype), d).astype(dtype)


def update(ema_tree, tree, decay):
  """ema = ema * decay + x * (1 - decay) for the float leaves, ema = x for the others.

  ema_tree, tree: pytrees of the same structure (params, batch_stats, ...); decay: scalar.
  Float leaves compute in float32 (float64 for float64 leaves) and keep the EMA leaf's dtype.
  """
  def one(e, x):
    e = jnp.asarray(e)
    if not jnp.issubdtype(e.dtype, jnp.floating):
      return jnp.asarray(x).astype(e.dtype)
    dtype = jnp.promote_types(e.dtype, jnp.float32)
    d = jnp.asarray(decay, dtype)
    return (e.astype(dtype) * d + jnp.asarray(x).astype(dtype) * (1 - d)).astype(e.dtype)
  return jax.tree.map(one, ema_tree, tree)
