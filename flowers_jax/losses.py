"""Classification and metric-learning losses.

Every loss takes per-example weights `mask` [B] (1 real, 0 padding; None = all
ones) and returns the mask-weighted mean over the batch as a scalar (0 when
the mask is all zeros). Losses compute in `precision.compute_dtype` of their
inputs: float32 for float32 and bfloat16 inputs, float64 for float64 ones.

- `cross_entropy`: torch `F.cross_entropy(..., label_smoothing=ls)`.
- `triplet_margin`: torch `nn.TripletMarginLoss(margin, p=2, eps=1e-6)`:
  `relu(margin + ||a - p + eps|| - ||a - n + eps||)`, with a norm whose
  gradient at 0 is 0 (as torch's), not NaN.
- `batch_hard_triplet`: Hermans et al. 2017, "In Defense of the Triplet Loss",
  on P x K batches: per anchor, the farthest positive and the closest negative
  in the (optionally all-gathered) batch.

`LOSSES` holds one `Loss` record per training loss (`config.train.loss`): its
function, the extra images it embeds ('positive', 'negative') and the sampler
its batches come from. Adding a loss is one function under `@register(...)`.
The train step calls `compute(name, train_cfg, outputs, batch)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flowers_jax.precision import promote

Array = jax.Array


def _weights(mask: Array | None, batch_size: int, dtype) -> Array:
  """The per-example weights [batch_size] in `dtype` (ones for no mask)."""
  if mask is None:
    return jnp.ones((batch_size,), dtype)
  return jnp.asarray(mask, dtype)


def _weighted_mean(values: Array, weights: Array) -> Array:
  """sum(w * v) / sum(w); 0 (with zero gradient) when sum(w) == 0."""
  den = jnp.sum(weights)
  return jnp.sum(weights * values) / jnp.where(den > 0, den, 1.0)


def safe_norm(x: Array, axis: int = -1) -> Array:
  """||x||_2 along `axis`; gradient 0 (not NaN) where the norm is 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def pairwise_distance(x1: Array, x2: Array, eps: float = 1e-6) -> Array:
  """torch `F.pairwise_distance(x1, x2, p=2, eps)`: ||x1 - x2 + eps||, [B]."""
  return safe_norm(x1 - x2 + eps)


def cdist(a: Array, b: Array) -> Array:
  """Euclidean distances [N, M] between rows of a [N, D] and b [M, D].

  Uses |a|^2 + |b|^2 - 2ab (no [N, M, D] intermediate), clamped at 0; the
  sqrt is guarded so that coincident points have distance 0 and gradient 0.
  """
  sq = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
        - 2.0 * a @ b.T)
  sq = jnp.maximum(sq, 0.0)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


# ----------------------------------------------------------------------------
# Losses.


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None,
                  label_smoothing: float = 0.0, targets: Array | None = None) -> Array:
  """Softmax CE of logits [B, C] against int labels [B], mean over mask; with soft
  `targets` [B, C] (mixup / cutmix: smoothing already in them) against those instead."""
  logits = promote(logits)
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(logits)
  if targets is not None:
    target = targets.astype(logits.dtype)
  else:
    target = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if label_smoothing:
      target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_example = -jnp.sum(target * logp, axis=-1)
  return _weighted_mean(per_example, _weights(mask, logits.shape[0], logits.dtype))


def triplet_margin(anchor: Array, positive: Array, negative: Array,
                   margin: float = 1.0, eps: float = 1e-6,
                   mask: Array | None = None) -> Array:
  """torch `nn.TripletMarginLoss(margin, p=2, eps)` on [B, D] embeddings."""
  anchor, positive, negative = (promote(x) for x in (anchor, positive, negative))
  d_pos = pairwise_distance(anchor, positive, eps)
  d_neg = pairwise_distance(anchor, negative, eps)
  per_example = jax.nn.relu(margin + d_pos - d_neg)
  return _weighted_mean(per_example, _weights(mask, anchor.shape[0], anchor.dtype))


def batch_hard_triplet(emb: Array, labels: Array, margin: float = 1.0,
                       mask: Array | None = None,
                       axis_name: str | None = None) -> Array:
  """Batch-hard triplet loss on embeddings [B, D] with labels [B].

  For each (unmasked) anchor i: relu(margin + max_{j: y_j = y_i, j != i} d_ij
  - min_{j: y_j != y_i} d_ij) over the unmasked rows j. Anchors without a
  positive or a negative are left out of the mean.

  With `axis_name` (inside pmap), candidates j are all-gathered over that
  axis so mining is global, and the loss of the local anchors is normalised
  by the global anchor count times the axis size: its pmean over the axis is
  exactly the global-batch loss, and pmean-ing the per-device gradients (the
  gather's transpose carries each loss's gradient back to the device that
  owns the embedding) gives the global-batch gradient.
  """
  emb = promote(emb)
  b = emb.shape[0]
  w = _weights(mask, b, emb.dtype)
  if axis_name is None:
    all_emb, all_labels, all_w, offset = emb, labels, w, 0
  else:
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    all_emb, all_labels, all_w = gather(emb), gather(labels), gather(w)
    offset = jax.lax.axis_index(axis_name) * b
  dist = cdist(emb, all_emb)                                     # [B, N]
  valid = all_w[None, :] > 0
  same = labels[:, None] == all_labels[None, :]
  not_self = (offset + jnp.arange(b))[:, None] != jnp.arange(
      all_emb.shape[0])[None, :]
  is_pos = same & not_self & valid
  is_neg = ~same & valid
  hardest_pos = jnp.max(jnp.where(is_pos, dist, 0.0), axis=1)
  # Non-negatives are pushed above every real distance before the min.
  far = jax.lax.stop_gradient(jnp.max(dist)) + 1.0
  hardest_neg = jnp.min(jnp.where(is_neg, dist, far), axis=1)
  per_anchor = jax.nn.relu(margin + hardest_pos - hardest_neg)
  usable = w * (jnp.any(is_pos, axis=1) & jnp.any(is_neg, axis=1))
  if axis_name is None:
    return _weighted_mean(per_anchor, usable)
  den = jax.lax.psum(jnp.sum(usable), axis_name)
  den = den / jax.lax.psum(1, axis_name)
  return jnp.sum(usable * per_anchor) / jnp.where(den > 0, den, 1.0)


# ----------------------------------------------------------------------------
# Registry used by the train step: one record per loss.


@dataclasses.dataclass(frozen=True)
class Loss:
  """A training loss and what it needs from the data and the forward pass.

  fn(cfg, outputs, batch, axis_name) -> (loss scalar, {part name: scalar}).
  extra_inputs: batch image keys embedded besides 'image' in the same forward pass; their
    pre-logits reach `fn` as `outputs['<key>_embedding']`.
  sampler: the train sampler (`data.samplers.SAMPLERS`) whose batches the loss expects.
  """
  name: str
  fn: Callable[..., tuple[Array, dict[str, Array]]]
  extra_inputs: tuple[str, ...] = ()
  sampler: str = 'random'


LOSSES: dict[str, Loss] = {}


def register(name: str, *, extra_inputs: tuple[str, ...] = (), sampler: str = 'random'):
  """Decorator adding `fn(cfg, outputs, batch, axis_name)` to `LOSSES` as `name`."""
  def decorator(fn):
    if name in LOSSES:
      raise ValueError(f'loss {name!r} is registered twice')
    LOSSES[name] = Loss(name, fn, tuple(extra_inputs), sampler)
    return fn
  return decorator


def _ce_term(cfg, outputs, batch) -> Array:
  return cross_entropy(outputs['logits'], batch['label'], batch.get('mask'),
                       float(cfg.label_smoothing), batch.get('soft_target'))


def _triplet_term(cfg, outputs, batch) -> Array:
  return triplet_margin(outputs['embedding'], outputs['positive_embedding'],
                        outputs['negative_embedding'], float(cfg.triplet_margin),
                        mask=batch.get('mask'))


@register('ce')
def _loss_ce(cfg, outputs, batch, axis_name):
  """Cross-entropy (with `label_smoothing`)."""
  del axis_name
  ce = _ce_term(cfg, outputs, batch)
  return ce, {'ce': ce}


@register('triplet', extra_inputs=('positive', 'negative'), sampler='triplet')
def _loss_triplet(cfg, outputs, batch, axis_name):
  """Triplet margin loss alone on the sampler's random triplets."""
  del axis_name
  tri = _triplet_term(cfg, outputs, batch)
  return tri, {'triplet': tri}


@register('tcel', extra_inputs=('positive', 'negative'), sampler='triplet')
def _loss_tcel(cfg, outputs, batch, axis_name):
  """The study's TCEL: CE + triplet_weight * triplet margin loss on random triplets."""
  del axis_name
  ce, tri = _ce_term(cfg, outputs, batch), _triplet_term(cfg, outputs, batch)
  return ce + float(cfg.triplet_weight) * tri, {'ce': ce, 'triplet': tri}


@register('tcel_hard', sampler='pk')
def _loss_tcel_hard(cfg, outputs, batch, axis_name):
  """CE + triplet_weight * batch-hard triplet loss on P x K batches (global mining)."""
  ce = _ce_term(cfg, outputs, batch)
  tri = batch_hard_triplet(outputs['embedding'], batch['label'], float(cfg.triplet_margin),
                           batch.get('mask'), axis_name)
  return ce + float(cfg.triplet_weight) * tri, {'ce': ce, 'triplet': tri}


def get(name: str) -> Loss:
  """The `Loss` record of `name`; ValueError naming the valid losses otherwise."""
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}; valid: {sorted(LOSSES)}')
  return LOSSES[name]


def compute(name: str, cfg: Any, outputs: Mapping[str, Array],
            batch: Mapping[str, Array], *, axis_name: str | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """The training loss `name` and its scalar parts.

  Args:
    name: a key of `LOSSES`.
    cfg: `config.train` (label_smoothing, triplet_margin, triplet_weight).
    outputs: {'logits': [B, C], 'embedding': [B, D]} for the anchor rows, plus
      '<key>_embedding' [B, D] for each of the loss's `extra_inputs`.
    batch: the batch dict ('label' [B], optional 'mask' [B]).
    axis_name: pmap axis for global batch-hard mining ('tcel_hard' only).

  Returns:
    (loss scalar, {'ce': ..., 'triplet': ...} the parts that apply).
  """
  return get(name).fn(cfg, outputs, batch, axis_name)
