"""The dtype rule of `flowers_jax/precision.py`: model outputs, losses and metrics compute in
float32 for float32 and bfloat16 runs (real runs, as before) and in float64 for float64 ones
(the equality tests, which need every value down to the loss in float64)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowers_jax import evaluators, losses, models
from flowers_jax.precision import compute_dtype

# Each model at a size where jax.eval_shape traces it in about a second; no arrays are made.
MODEL_INPUTS = {'resnet18': ({}, 32), 'efficientnet_b0': ({}, 32),
                'vit_b16': ({'image_size': 32}, 32)}
RUN_DTYPES = [('float32', 'float32'), ('bfloat16', 'float32'), ('float64', 'float64')]


@pytest.mark.parametrize('name', sorted(MODEL_INPUTS))
@pytest.mark.parametrize('dtype,expected', RUN_DTYPES)
def test_model_outputs_are_float32_in_real_runs_and_float64_in_float64_ones(name, dtype,
                                                                            expected):
  options, size = MODEL_INPUTS[name]
  with jax.enable_x64(dtype == 'float64'):
    model = models.create(name, num_classes=5, dtype=jnp.dtype(dtype), **options)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.dtype(dtype))
    (logits, out), _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
  assert (logits.shape, logits.dtype) == ((2, 5), jnp.dtype(expected))
  assert out['pre_logits'].dtype == jnp.dtype(expected)


def test_compute_dtype():
  assert compute_dtype(jnp.bfloat16) == jnp.float32
  assert compute_dtype(jnp.float32) == jnp.float32
  assert compute_dtype(jnp.int32) == jnp.float32
  with jax.enable_x64(True):
    assert compute_dtype(jnp.float64) == jnp.float64


def _ce_numpy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Cross-entropy in float64 numpy."""
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return float(-logp[np.arange(len(labels)), labels].mean())


def _loss_inputs(rng):
  """Logits 1e-9 apart, so a float32 step anywhere moves the loss by ~1e-8; embeddings [8, 4]."""
  logits = 3.0 + 1e-9 * rng.normal(size=(8, 5))
  labels = rng.integers(0, 5, 8)
  emb = rng.normal(size=(3, 8, 4))
  return logits, labels, emb


def test_losses_are_float64_end_to_end_for_float64_inputs():
  logits, labels, emb = _loss_inputs(np.random.default_rng(0))
  with jax.enable_x64(True):
    ce = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                              mask=np.ones(8, np.float32))
    assert ce.dtype == jnp.float64
    assert abs(float(ce) - _ce_numpy(logits, labels)) < 1e-13
    tri = losses.triplet_margin(*map(jnp.asarray, emb), margin=10.0)
    ref = np.mean(10.0 + np.linalg.norm(emb[0] - emb[1] + 1e-6, axis=1)
                  - np.linalg.norm(emb[0] - emb[2] + 1e-6, axis=1))
    assert tri.dtype == jnp.float64 and abs(float(tri) - ref) < 1e-13
    hard = losses.batch_hard_triplet(jnp.asarray(emb[0]), jnp.asarray(labels % 2))
    assert hard.dtype == jnp.float64


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_losses_stay_float32_for_real_runs(dtype):
  logits, labels, emb = _loss_inputs(np.random.default_rng(0))
  cast = lambda x: jnp.asarray(x, dtype)
  ce = losses.cross_entropy(cast(logits), jnp.asarray(labels))
  assert ce.dtype == jnp.float32
  np.testing.assert_allclose(float(ce), _ce_numpy(logits, labels), rtol=1e-6)
  assert losses.triplet_margin(*map(cast, emb)).dtype == jnp.float32
  assert losses.batch_hard_triplet(cast(emb[0]), jnp.asarray(labels % 2)).dtype == jnp.float32


def test_eval_step_computes_the_loss_in_float64_in_float64_runs():
  """The eval step's summed loss in a float64 run equals numpy's float64 cross-entropy."""
  logits, labels, _ = _loss_inputs(np.random.default_rng(1))

  class Fixed:  # a "model" whose logits are the fixed array, so only the metric computes
    def apply(self, variables, images, train):
      del variables, train
      return images[:, 0, 0, :5], {'pre_logits': images[:, 0, 0, :5]}

  cfg = ml_collections.ConfigDict({'knn_k': 1})
  with jax.enable_x64(True):
    step = evaluators.make_eval_step(Fixed(), evaluators.get('classification'), cfg,
                                     axis_name=None)
    state = type('State', (), {'variables': {}})()
    batch = {'image': jnp.asarray(logits)[:, None, None, :], 'label': jnp.asarray(labels),
             'mask': jnp.ones(8, jnp.float32)}
    sums = step(state, batch)['sums']
  assert sums['loss'].dtype == jnp.float64
  assert abs(float(sums['loss']) / 8 - _ce_numpy(logits, labels)) < 1e-13
