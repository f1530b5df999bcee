"""Evaluators: what a run measures on a split, chosen by `config.evals.names`.

The loop evaluates the validation split after every epoch and the test split at the best
checkpoint. One compiled eval step runs the model once per batch and gives every chosen evaluator
the `logits [B, C]` and `pre_logits [B, D]` in float32 (float64 in float64 runs, `precision.py`);
each evaluator returns

  sums  arrays added over the batch's real rows (mask 1), reduced over devices and hosts in the
        step, then added over batches on the host: exact on any device count;
  rows  per-example arrays [B, ...] gathered over devices and hosts in the step (the step's
        `label` and `mask` rows come with them); the host keeps the real rows.

and, on the host, `result(sums, rows, reference) -> (scalars, arrays)`. `reference` is the same
step's output on `reference_split` (the train split in its eval view), for evaluators that compare
a split against it. Scalars go into metrics.jsonl (`val_<name>`) and results.json (`test_<name>`);
arrays are written next to them at test time (`<name>_test.npy`).

Registered:
  classification  accuracy (top-1), top5, loss (cross-entropy), examples; arrays: confusion
                  (int [C, C], rows true class, columns predicted), per_class_accuracy [C]
                  (NaN for a class absent from the split).
  embedding       knn_accuracy (majority vote of the `evals.knn_k` nearest train embeddings),
                  recall_at_1, recall_at_5 (a same-class train image among the K nearest),
                  Euclidean distance on pre-logits: the space the triplet losses shape.

Adding one: a `device` and a `result` function and one `register(Evaluator(...))` line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flowers_jax import normalization, parallel
from flowers_jax.precision import promote

Array = jax.Array
Scalars = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """device(logits, pre_logits, batch, axis_name, cfg) -> (sums, rows), inside the step;
  result(sums, rows, reference, cfg) -> (scalars, arrays), on the host."""
  name: str
  device: Callable[..., tuple[dict, dict]]
  result: Callable[..., tuple[Scalars, dict[str, np.ndarray]]]
  reference_split: str | None = None


EVALUATORS: dict[str, Evaluator] = {}


def register(evaluator: Evaluator) -> Evaluator:
  if evaluator.name in EVALUATORS:
    raise ValueError(f'evaluator {evaluator.name!r} is registered twice')
  EVALUATORS[evaluator.name] = evaluator
  return evaluator


def parse_names(names: str) -> tuple[str, ...]:
  """'classification,embedding' -> the names, checked; classification must be one of them
  (the best checkpoint is the one of the best validation accuracy)."""
  parsed = tuple(n.strip() for n in str(names).split(',') if n.strip())
  unknown = [n for n in parsed if n not in EVALUATORS]
  if unknown or 'classification' not in parsed:
    raise ValueError(f'evals.names={names!r}: comma-separated evaluators including '
                     f'classification; valid: {", ".join(EVALUATORS)}')
  return parsed


def get(names: str) -> tuple[Evaluator, ...]:
  return tuple(EVALUATORS[n] for n in parse_names(names))


# ------------------------------------------------------------------------------------------
# classification


def _classification_device(logits, pre_logits, batch, axis_name, cfg):
  del pre_logits, cfg
  mask, labels = batch['mask'], batch['label']
  num_classes = logits.shape[-1]
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  predicted = jnp.argmax(logits, -1)
  top5 = jnp.any(jax.lax.top_k(logits, min(5, num_classes))[1] == labels[:, None], axis=-1)
  truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
  confusion = jnp.matmul(truth.T, jax.nn.one_hot(predicted, num_classes, dtype=jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)  # counts: exact in float32
  sums = {'loss': mask * ce, 'correct': mask * (predicted == labels),
          'correct5': mask * top5, 'count': mask}
  sums = {k: parallel.reduce_sum(v, axis_name) for k, v in sums.items()}
  sums['confusion'] = jax.lax.psum(confusion, axis_name) if axis_name else confusion
  return sums, {}


def _classification_result(sums, rows, reference, cfg):
  del rows, reference, cfg
  n = float(sums['count'])
  confusion = np.rint(sums['confusion']).astype(np.int64)
  rows_per_class = confusion.sum(1)
  per_class = np.where(rows_per_class > 0, np.diag(confusion) / np.maximum(rows_per_class, 1),
                       np.nan)  # NaN (null in results.json): a class absent from the split
  scalars = {'accuracy': float(sums['correct']) / n, 'top5': float(sums['correct5']) / n,
             'loss': float(sums['loss']) / n, 'examples': int(n)}
  return scalars, {'confusion': confusion, 'per_class_accuracy': per_class}


register(Evaluator('classification', _classification_device, _classification_result))


# ------------------------------------------------------------------------------------------
# embedding

RECALL_AT = (1, 5)


def _embedding_device(logits, pre_logits, batch, axis_name, cfg):
  del logits, batch, axis_name, cfg
  return {}, {'pre_logits': pre_logits}


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
  """int [Nq, k]: rows of `reference` [Nr, D] nearest to each query [Nq, D] (Euclidean, in
  float64, as |q|^2 + |r|^2 - 2 q.r). Equal computed distances (duplicate reference rows among
  them) go to the lower row; distances equal only in exact arithmetic may differ in their last
  bits here and come in either order."""
  q, r = queries.astype(np.float64), reference.astype(np.float64)
  d2 = (q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * q @ r.T
  return np.argsort(d2, axis=1, kind='stable')[:, :k]


def knn_vote(neighbour_labels: np.ndarray) -> np.ndarray:
  """int [Nq]: the most frequent label of each row of [Nq, k] (nearest first); a tie goes to
  the tied label met first, i.e. the one with the nearer neighbour."""
  out = np.empty(len(neighbour_labels), np.int64)
  for i, labels in enumerate(neighbour_labels):
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    best = counts == counts.max()
    out[i] = values[best][np.argmin(first[best])]
  return out


def _embedding_result(sums, rows, reference, cfg):
  del sums
  k = int(cfg.knn_k)
  ref_emb, ref_labels = reference['pre_logits'], reference['label']
  depth = min(max(k, *RECALL_AT), len(ref_labels))
  neighbours = ref_labels[nearest_neighbours(rows['pre_logits'], ref_emb, depth)]
  hit = neighbours == rows['label'][:, None]
  scalars = {'knn_accuracy': float(np.mean(knn_vote(neighbours[:, :k]) == rows['label']))}
  scalars.update({f'recall_at_{r}': float(np.mean(hit[:, :r].any(1))) for r in RECALL_AT})
  return scalars, {}


register(Evaluator('embedding', _embedding_device, _embedding_result, reference_split='train'))


# ------------------------------------------------------------------------------------------
# the step and the host loop


def make_eval_step(model, evaluators: tuple[Evaluator, ...], evals_cfg: Any, *,
                   axis_name: str | None, mean: Sequence[float] = normalization.IMAGENET_MEAN,
                   std: Sequence[float] = normalization.IMAGENET_STD):
  """Returns `eval_step(state, batch) -> {'sums': {...}, 'rows': {...}}` for `evaluators`.

  batch: `image [B, H, W, 3]` (uint8: normalised here with `mean` / `std`; float: taken as
  normalised), `label [B]`, `mask [B]` (0 for padding rows).
  """
  def gather(x):
    return jax.lax.all_gather(x, axis_name, tiled=True) if axis_name else x

  def eval_step(state, batch: dict):
    images = normalization.normalize(batch['image'], mean, std)
    logits, out = model.apply(state.variables, images, train=False)
    logits, pre_logits = promote(logits), promote(out['pre_logits'])
    sums, rows = {}, {}
    for e in evaluators:
      s, r = e.device(logits, pre_logits, batch, axis_name, evals_cfg)
      sums.update(s)
      rows.update(r)
    if rows:
      rows.update(label=batch['label'], mask=batch['mask'])
    return {'sums': sums, 'rows': {k: gather(v) for k, v in rows.items()}}

  return eval_step


@dataclasses.dataclass
class Evaluation:
  """One split's scalars (`accuracy`, `knn_accuracy`, ...) and arrays (`confusion`, ...)."""
  scalars: Scalars
  arrays: dict[str, np.ndarray]


def _outputs(eval_step, strategy, state, ds, split: str, batch_size: int) -> tuple[dict, dict]:
  """(sums added over batches, real rows concatenated) of one pass over `split`.

  Batches go to the devices ahead of use and every step is dispatched before any result is
  read, so the host never waits on the device between batches.
  """
  batches = parallel.prefetch_to_device(ds.eval_batches(split, batch_size), strategy)
  outputs = [eval_step(state, batch) for batch in batches]
  sums, rows = None, {}
  for out in outputs:
    out = strategy.get_metrics(out)
    sums = out['sums'] if sums is None else jax.tree.map(np.add, sums, out['sums'])
    real = out['rows'].get('mask', np.zeros(0)) > 0
    for k, v in out['rows'].items():
      rows.setdefault(k, []).append(np.asarray(v)[real])
  return sums, {k: np.concatenate(v) for k, v in rows.items()}


def evaluate(evaluators: tuple[Evaluator, ...], evals_cfg: Any, eval_step, strategy, state,
             ds, split: str, batch_size: int) -> Evaluation:
  """Every evaluator's result on every example of `split` exactly once."""
  sums, rows = _outputs(eval_step, strategy, state, ds, split, batch_size)
  references = {e.reference_split for e in evaluators if e.reference_split}
  reference = {name: _outputs(eval_step, strategy, state, ds, name, batch_size)[1]
               for name in sorted(references)}
  scalars, arrays = {}, {}
  for e in evaluators:
    s, a = e.result(sums, rows, reference.get(e.reference_split), evals_cfg)
    scalars.update(s)
    arrays.update(a)
  return Evaluation(scalars, arrays)
