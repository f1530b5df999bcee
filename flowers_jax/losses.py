"""Classification and metric-learning losses.

Every loss takes per-example weights `mask` [B] (1 real, 0 padding; None = all
ones) and returns the mask-weighted mean over the batch as a float32 scalar
(0 when the mask is all zeros). Inputs may be bfloat16; losses compute in
float32.

- `cross_entropy`: torch `F.cross_entropy(..., label_smoothing=ls)`.
- `triplet_margin`: torch `nn.TripletMarginLoss(margin, p=2, eps=1e-6)`:
  `relu(margin + ||a - p + eps|| - ||a - n + eps||)`, with a norm whose
  gradient at 0 is 0 (as torch's), not NaN.
- `batch_hard_triplet`: Hermans et al. 2017, "In Defense of the Triplet Loss",
  on P x K batches: per anchor, the farthest positive and the closest negative
  in the (optionally all-gathered) batch.
- `tcel`: the study's TCEL = CE + weight * triplet on random triplets.

The train step calls `compute(name, train_cfg, outputs, batch)`; `NEEDS[name]`
says which extra images ('positive', 'negative') it must embed first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flowers_jax import config_utils

Array = jax.Array


def _weights(mask: Array | None, batch_size: int) -> Array:
  if mask is None:
    return jnp.ones((batch_size,), jnp.float32)
  return jnp.asarray(mask, jnp.float32)


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
                  label_smoothing: float = 0.0) -> Array:
  """Softmax CE of logits [B, C] against int labels [B], mean over mask."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(logits)
  target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_example = -jnp.sum(target * logp, axis=-1)
  return _weighted_mean(per_example, _weights(mask, logits.shape[0]))


def accuracy_counts(logits: Array, labels: Array, mask: Array | None = None,
                    topk: tuple[int, ...] = (1,)) -> dict[str, Array]:
  """{'correct': #top-1 hits, 'correct_top{k}': ..., 'count': sum(mask)}."""
  w = _weights(mask, logits.shape[0])
  out = {'count': jnp.sum(w)}
  for k in topk:
    _, idx = jax.lax.top_k(logits.astype(jnp.float32), k)
    hit = jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)
    out['correct' if k == 1 else f'correct_top{k}'] = jnp.sum(w * hit)
  return out


def triplet_margin(anchor: Array, positive: Array, negative: Array,
                   margin: float = 1.0, eps: float = 1e-6,
                   mask: Array | None = None) -> Array:
  """torch `nn.TripletMarginLoss(margin, p=2, eps)` on [B, D] embeddings."""
  anchor, positive, negative = (
      x.astype(jnp.float32) for x in (anchor, positive, negative))
  d_pos = pairwise_distance(anchor, positive, eps)
  d_neg = pairwise_distance(anchor, negative, eps)
  per_example = jax.nn.relu(margin + d_pos - d_neg)
  return _weighted_mean(per_example, _weights(mask, anchor.shape[0]))


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
  emb = emb.astype(jnp.float32)
  b = emb.shape[0]
  w = _weights(mask, b)
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


def tcel(logits: Array, emb_anchor: Array, emb_pos: Array, emb_neg: Array,
         labels: Array, weight: float = 1.0, margin: float = 1.0,
         mask: Array | None = None, label_smoothing: float = 0.0) -> Array:
  """The study's TCEL: CE(logits, labels) + weight * TripletMarginLoss."""
  return (cross_entropy(logits, labels, mask, label_smoothing)
          + weight * triplet_margin(emb_anchor, emb_pos, emb_neg, margin,
                                    mask=mask))


# ----------------------------------------------------------------------------
# Registry used by the train step.

# Extra images (batch keys) each loss needs embedded besides 'image'.
NEEDS: dict[str, tuple[str, ...]] = {
    'ce': (),
    'tcel': ('positive', 'negative'),
    'triplet': ('positive', 'negative'),
    'tcel_hard': (),
}

# The train sampler (`data.Dataset.train_batches(sampler=...)`) whose batches each loss expects:
# random triplets for the study's losses, P x K batches for batch-hard mining.
SAMPLER: dict[str, str] = {'ce': 'random', 'tcel': 'triplet', 'triplet': 'triplet',
                           'tcel_hard': 'pk'}

LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def _ce_term(cfg, outputs, batch) -> Array:
  return cross_entropy(outputs['logits'], batch['label'], batch.get('mask'),
                       float(config_utils.get(cfg, 'label_smoothing', 0.0)))


def _triplet_term(cfg, outputs, batch) -> Array:
  return triplet_margin(outputs['embedding'], outputs['positive_embedding'],
                        outputs['negative_embedding'],
                        float(config_utils.get(cfg, 'triplet_margin', 1.0)),
                        mask=batch.get('mask'))


def _hard_term(cfg, outputs, batch, axis_name) -> Array:
  return batch_hard_triplet(outputs['embedding'], batch['label'],
                            float(config_utils.get(cfg, 'triplet_margin', 1.0)),
                            batch.get('mask'), axis_name)


def _loss_ce(cfg, outputs, batch, axis_name):
  del axis_name
  ce = _ce_term(cfg, outputs, batch)
  return ce, {'ce': ce}


def _loss_triplet(cfg, outputs, batch, axis_name):
  del axis_name
  tri = _triplet_term(cfg, outputs, batch)
  return tri, {'triplet': tri}


def _loss_tcel(cfg, outputs, batch, axis_name):
  del axis_name
  ce, tri = _ce_term(cfg, outputs, batch), _triplet_term(cfg, outputs, batch)
  weight = float(config_utils.get(cfg, 'triplet_weight', 1.0))
  return ce + weight * tri, {'ce': ce, 'triplet': tri}


def _loss_tcel_hard(cfg, outputs, batch, axis_name):
  ce = _ce_term(cfg, outputs, batch)
  tri = _hard_term(cfg, outputs, batch, axis_name)
  weight = float(config_utils.get(cfg, 'triplet_weight', 1.0))
  return ce + weight * tri, {'ce': ce, 'triplet': tri}


LOSSES: dict[str, LossFn] = {
    'ce': _loss_ce,
    'tcel': _loss_tcel,
    'triplet': _loss_triplet,
    'tcel_hard': _loss_tcel_hard,
}


def get(name: str) -> LossFn:
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}; valid: {sorted(LOSSES)}')
  return LOSSES[name]


def compute(name: str, cfg: Any, outputs: Mapping[str, Array],
            batch: Mapping[str, Array], *, axis_name: str | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """The training loss `name` and its scalar parts.

  Args:
    name: 'ce' | 'tcel' | 'triplet' | 'tcel_hard'.
    cfg: `config.train` (label_smoothing, triplet_margin, triplet_weight).
    outputs: {'logits': [B, C], 'embedding': [B, D]} for the anchor rows,
      plus {'positive_embedding', 'negative_embedding'}: [B, D] for the
      losses whose `NEEDS` lists 'positive', 'negative'.
    batch: the batch dict ('label' [B], optional 'mask' [B]).
    axis_name: pmap axis for global batch-hard mining ('tcel_hard' only).

  Returns:
    (loss scalar, {'ce': ..., 'triplet': ...} the parts that apply).
  """
  return get(name)(cfg, outputs, batch, axis_name)
