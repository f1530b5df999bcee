"""Index plans: which example goes in which row of which global batch (pure numpy).

A plan is a dict of int arrays ``[steps, global_batch]`` of positions into a split
(``index``; triplet plans add ``positive`` and ``negative``). Train plans are pure
functions of ``(labels, global_batch, seed, epoch)``: the anchor order comes from
``np.random.default_rng([seed, epoch])``, the triplet / PK choices from streams of
their own, so the ``random`` and ``triplet`` samplers see the same anchors.
Train plans drop the remainder; ``eval_plan`` pads the last batch (``mask`` 0).
``host_rows`` cuts a global plan into the rows of one host.

The training loop reads one continuous ``stream``: pass ``p`` over the split is the
sampler's order for ``epoch=p`` taken whole (``pass_order``: the permutation of all n
examples for 'random' and 'triplet', P x K batches for 'pk'), the passes follow each
other, and the stream is cut into global batches across pass boundaries: nothing is
dropped, and step ``s`` of the stream is a pure function of ``(seed, s)``.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

_TRIPLET_STREAM, _PK_STREAM = 1, 2


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
  if seed < 0 or epoch < 0:
    raise ValueError(f'seed and epoch must be >= 0, got seed={seed}, epoch={epoch}')
  return np.random.default_rng([seed, epoch] + ([stream] if stream else []))


def num_steps(n: int, global_batch: int, split: str = 'train') -> int:
  """Train steps per epoch (drop remainder); error if ``n < global_batch``."""
  if global_batch <= 0:
    raise ValueError(f'global batch size must be positive, got {global_batch}')
  if n < global_batch:
    raise ValueError(f'Split {split!r} has {n} examples, fewer than one global batch of'
                     f' {global_batch}; use a smaller batch size.')
  return n // global_batch


def random_plan(labels: np.ndarray, global_batch: int, seed: int, epoch: int) -> dict:
  """A permutation of the split, cut into ``n // global_batch`` batches."""
  steps = num_steps(len(labels), global_batch)
  order = epoch_rng(seed, epoch).permutation(len(labels))
  return {'index': order[:steps * global_batch].reshape(steps, global_batch)}


def _class_blocks(labels: np.ndarray):
  """(positions sorted by class, start of each example's class block, its class size)."""
  by_class = np.argsort(labels, kind='stable')
  counts = np.bincount(labels)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return by_class, starts, counts


def triplet_plan(labels: np.ndarray, global_batch: int, seed: int, epoch: int) -> dict:
  """The random plan's anchors, each with a random positive and negative.

  The positive is uniform over the anchor's class minus the anchor itself (the
  anchor itself when it is alone in its class); the negative is uniform over all
  examples of other classes.
  """
  labels = np.asarray(labels)
  if len(np.unique(labels)) < 2:
    raise ValueError('The triplet sampler needs at least 2 classes in the train split.')
  anchor = random_plan(labels, global_batch, seed, epoch)['index']
  return {'index': anchor, **_partners(labels, anchor, seed, epoch)}


def _partners(labels: np.ndarray, anchor: np.ndarray, seed: int, epoch: int) -> dict:
  """A random positive and negative (positions, shaped like ``anchor``) for each anchor."""
  by_class, starts, counts = _class_blocks(labels)
  rank = np.empty(len(labels), np.int64)  # position of each example in by_class
  rank[by_class] = np.arange(len(labels))
  rng = epoch_rng(seed, epoch, _TRIPLET_STREAM)
  c = labels[anchor]
  n_c, start = counts[c], starts[c]
  # Positive: draw among the n_c - 1 others, skip over the anchor's own slot.
  r = np.floor(rng.random(anchor.shape) * np.maximum(n_c - 1, 1)).astype(np.int64)
  own = rank[anchor] - start
  r = np.where(n_c > 1, r + (r >= own), 0)
  positive = by_class[start + r]
  # Negative: draw among the N - n_c others, skip over the anchor's class block.
  r = np.floor(rng.random(anchor.shape) * (len(labels) - n_c)).astype(np.int64)
  negative = by_class[r + np.where(r >= start, n_c, 0)]
  return {'positive': positive, 'negative': negative}


def pk_plan(labels: np.ndarray, global_batch: int, seed: int, epoch: int, k: int = 4) -> dict:
  """Batches of P classes x K images (``global_batch = P * K``), class-major rows.

  Each batch draws P distinct classes, then K images of each (with replacement
  when the class has fewer than K). Same number of steps as the random plan.
  """
  labels = np.asarray(labels)
  if k <= 0 or global_batch % k:
    raise ValueError(f'The PK sampler needs global_batch = P * K; {global_batch} is not a'
                     f' multiple of K={k}.')
  p = global_batch // k
  classes = np.unique(labels)
  if p > len(classes):
    raise ValueError(f'The PK sampler needs P={p} classes per batch (global batch'
                     f' {global_batch} / K={k}) but the train split has {len(classes)}.')
  steps = num_steps(len(labels), global_batch)
  by_class, starts, counts = _class_blocks(labels)
  rng = epoch_rng(seed, epoch, _PK_STREAM)
  index = np.empty((steps, p, k), np.int64)
  for s in range(steps):
    for j, c in enumerate(rng.choice(classes, p, replace=False)):
      pick = rng.choice(counts[c], k, replace=counts[c] < k)
      index[s, j] = by_class[starts[c] + pick]
  return {'index': index.reshape(steps, global_batch)}


def eval_plan(n: int, global_batch: int) -> dict:
  """Positions 0..n-1 in order, padded to ``ceil(n / global_batch)`` batches.

  Returns ``index`` (padding rows point at position 0) and ``mask`` (1 real, 0 pad),
  both ``[steps, global_batch]``.
  """
  if global_batch <= 0:
    raise ValueError(f'global batch size must be positive, got {global_batch}')
  steps = -(-n // global_batch)
  flat = np.arange(steps * global_batch)
  return {'index': np.where(flat < n, flat, 0).reshape(steps, global_batch),
          'mask': (flat < n).astype(np.float32).reshape(steps, global_batch)}


def host_rows(plan: dict, process_index: int, process_count: int) -> dict:
  """Rows ``[process_index * b, (process_index + 1) * b)`` of every batch, b = G / hosts."""
  global_batch = next(iter(plan.values())).shape[1]
  if global_batch % process_count:
    raise ValueError(f'global batch size {global_batch} is not divisible by the'
                     f' {process_count} processes.')
  b = global_batch // process_count
  return {k: v[:, process_index * b:(process_index + 1) * b] for k, v in plan.items()}


def pass_order(sampler: str, labels: np.ndarray, global_batch: int, seed: int, pass_: int,
               k: int = 4) -> dict:
  """Pass ``pass_`` of the stream: flat int arrays [L] of positions (``index``, and the
  triplet sampler's ``positive`` / ``negative``); L is the same for every pass."""
  labels = np.asarray(labels)
  if sampler == 'pk':
    return {'index': pk_plan(labels, global_batch, seed, pass_, k)['index'].reshape(-1)}
  num_steps(len(labels), global_batch)  # at least one batch
  order = {'index': epoch_rng(seed, pass_).permutation(len(labels))}
  if sampler == 'triplet':
    if len(np.unique(labels)) < 2:
      raise ValueError('The triplet sampler needs at least 2 classes in the train split.')
    order.update(_partners(labels, order['index'], seed, pass_))
  return order


def stream(sampler: str, labels: np.ndarray, global_batch: int, seed: int,
           start_step: int = 0, k: int = 4) -> Iterator[dict]:
  """Global batches ``start_step, start_step + 1, ...`` of the endless train stream.

  Yields dicts of int64 arrays [global_batch]: the ``pass_order`` keys, ``pass`` (the pass
  each row comes from) and ``position`` (its place in that pass; with ``pass`` it seeds the
  row's augmentation).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'Unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}.')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  n = len(labels)
  length = num_steps(n, global_batch) * global_batch if sampler == 'pk' else n  # of every pass
  pass_, offset = divmod(start_step * global_batch, length)
  pending: list[dict] = []
  have = 0
  while True:
    order = pass_order(sampler, labels, global_batch, seed, pass_, k)
    part = {key: v[offset:] for key, v in order.items()}
    part['pass'] = np.full(length - offset, pass_, np.int64)
    part['position'] = np.arange(offset, length, dtype=np.int64)
    pending.append(part)
    have += length - offset
    pass_, offset = pass_ + 1, 0
    if have < global_batch:
      continue
    joined = {key: np.concatenate([p[key] for p in pending]).astype(np.int64)
              for key in pending[0]}
    whole = have // global_batch * global_batch
    for i in range(0, whole, global_batch):
      yield {key: v[i:i + global_batch] for key, v in joined.items()}
    pending = [{key: v[whole:] for key, v in joined.items()}]
    have -= whole


SAMPLERS: dict[str, Callable[..., dict]] = {
    'random': random_plan,
    'triplet': triplet_plan,
    'pk': pk_plan,
}
