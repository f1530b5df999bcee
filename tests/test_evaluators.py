"""Evaluators: values against numpy references, and the same results on any device count."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowers_jax import evaluators, parallel
from flowers_jax.steps import TrainState

NUM_CLASSES, DIM = 5, 6
CFG = ml_collections.ConfigDict({'names': 'classification,embedding', 'knn_k': 3})


def test_nearest_neighbours_and_vote():
  reference = np.array([[0.0], [1.0], [2.0], [10.0]])
  queries = np.array([[0.4], [9.0], [1.5]])
  np.testing.assert_array_equal(evaluators.nearest_neighbours(queries, reference, 2),
                                [[0, 1], [3, 2], [1, 2]])  # 1.5: a tie, the lower row first
  np.testing.assert_array_equal(evaluators.knn_vote(np.array([[3, 1, 1], [2, 4, 4], [7, 8, 9]])),
                                [1, 4, 7])  # majority; a 1-1-1 tie goes to the nearest


def test_parse_names_needs_classification_and_names_the_valid_ones():
  assert evaluators.parse_names(' classification, embedding ') == ('classification', 'embedding')
  for bad in ('embedding', 'classification,knn', ''):
    with pytest.raises(ValueError, match='valid: classification, embedding'):
      evaluators.parse_names(bad)


class Toy(nn.Module):
  """[B, 4] -> (logits [B, 5], {'pre_logits': [B, 6]})."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    pre_logits = jnp.tanh(nn.Dense(DIM)(x))
    return nn.Dense(NUM_CLASSES)(pre_logits), {'pre_logits': pre_logits}


class FakeData:
  """`eval_batches` like `data.Dataset`'s: padded batches, mask 0 on the padding rows."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.splits = {name: (rng.normal(size=(n, 4)).astype(np.float32),
                          rng.integers(0, NUM_CLASSES, n).astype(np.int32))
                   for name, n in (('train', 37), ('test', 21))}

  def eval_batches(self, split, batch_size):
    x, y = self.splits[split]
    for start in range(0, len(y), batch_size):
      pad = max(0, start + batch_size - len(y))
      rows = slice(start, start + batch_size)
      yield {'image': np.pad(x[rows], ((0, pad), (0, 0))),
             'label': np.pad(y[rows], (0, pad)),
             'mask': np.pad(np.ones(len(y[rows]), np.float32), (0, pad))}


@pytest.fixture(scope='module')
def toy_state():
  model = Toy()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  return model, TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                           batch_stats={}, opt_state=(), rng=jnp.zeros((2,), jnp.uint32))


def _evaluate(model, state, strategy, split='test', batch_size=8):
  evals = evaluators.get(CFG.names)
  axis = strategy.axis_name if strategy is not None else None
  step = evaluators.make_eval_step(model, evals, CFG, axis_name=axis)
  if strategy is None:
    strategy = _OneDevice()
  else:
    step = strategy.compile(step, donate_state=False)
    state = strategy.put_state(state)
  return evaluators.evaluate(evals, CFG, step, strategy, state, FakeData(), split, batch_size)


class _OneDevice:
  """The step un-compiled on the default device: the reference for the parallel modes."""
  axis_name = None

  def put_batch(self, batch):
    return batch

  def get_metrics(self, out):
    return jax.tree.map(np.asarray, out)


def _reference(model, state):
  """Every metric from numpy on the whole split at once."""
  ds = FakeData()
  (x, y), (xr, yr) = ds.splits['test'], ds.splits['train']
  logits, out = model.apply({'params': state.params}, x)
  logits, pre = np.asarray(logits, np.float64), np.asarray(out['pre_logits'], np.float64)
  pre_train = np.asarray(model.apply({'params': state.params}, xr)[1]['pre_logits'], np.float64)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  pred = logits.argmax(1)
  confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(confusion, (y, pred), 1)
  dist = np.linalg.norm(pre[:, None] - pre_train[None], axis=-1)
  order = np.argsort(dist, axis=1, kind='stable')
  def vote(labels):  # the majority; a tie goes to the tied label of the nearest neighbour
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return next(label for label in labels if counts[label] == counts.max())
  return {
      'accuracy': np.mean(pred == y), 'loss': -np.mean(logp[np.arange(len(y)), y]),
      'top5': 1.0, 'examples': len(y), 'confusion': confusion,
      'knn_accuracy': np.mean([vote(yr[o[:3]]) == t for o, t in zip(order, y)]),
      'recall_at_1': np.mean(yr[order[:, 0]] == y),
      'recall_at_5': np.mean([t in yr[o[:5]] for o, t in zip(order, y)]),
  }


def test_results_equal_a_numpy_reference(toy_state):
  model, state = toy_state
  got, ref = _evaluate(model, state, None), _reference(model, state)
  np.testing.assert_array_equal(got.arrays['confusion'], ref['confusion'])
  np.testing.assert_allclose(got.arrays['per_class_accuracy'],
                             np.diag(ref['confusion']) / ref['confusion'].sum(1))
  for k in ('accuracy', 'loss', 'top5', 'examples', 'knn_accuracy', 'recall_at_1',
            'recall_at_5'):
    np.testing.assert_allclose(got.scalars[k], ref[k], rtol=1e-5, err_msg=k)
  assert 0 < got.scalars['recall_at_1'] < got.scalars['recall_at_5'] < 1  # not trivially 0 or 1


def test_per_class_accuracy_of_a_class_absent_from_the_split_is_null():
  """Not 0.0 ("all wrong"): NaN in the array, null in results.json."""
  from flowers_jax import train
  confusion = np.array([[2, 1, 0], [0, 0, 0], [0, 1, 3]], np.float32)  # class 1: no row
  sums = {'count': 7.0, 'correct': 5.0, 'correct5': 7.0, 'loss': 1.0, 'confusion': confusion}
  _, arrays = evaluators.EVALUATORS['classification'].result(sums, {}, None, None)
  per_class = arrays['per_class_accuracy']
  assert per_class[0] == 2 / 3 and np.isnan(per_class[1]) and per_class[2] == 0.75
  assert json.loads(train._dumps(per_class.tolist())) == [2 / 3, None, 0.75]


@pytest.mark.parametrize('mode,n_devices', [('pmap', 4), ('pmap', 2), ('sharded', 4)])
def test_same_results_on_any_device_count(toy_state, mode, n_devices):
  model, state = toy_state
  one = _evaluate(model, state, None)
  got = _evaluate(model, state, parallel.make(mode, jax.devices()[:n_devices]))
  np.testing.assert_array_equal(got.arrays['confusion'], one.arrays['confusion'])
  assert got.scalars.keys() == one.scalars.keys()
  for k, v in one.scalars.items():
    np.testing.assert_allclose(got.scalars[k], v, rtol=1e-6, err_msg=k)
