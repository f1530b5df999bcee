"""Model option `remat` (activation checkpointing per ViT encoder block / ResNet and EfficientNet
stage): the same parameter paths, the same numbers, and a backward pass that recomputes instead
of keeping the activations.

The memory saving itself is asserted on what JAX keeps for the backward pass (the residuals of
`jax.vjp`, backend independent) and, on GPU / TPU only, on XLA's compiled buffer sizes: XLA:CPU
expands jax.checkpoint's optimization barriers before its last CSE and scheduling passes, which
merge the recomputation back into the forward pass, so on CPU remat saves nothing
(scripts/benchmarks/memory.py).
"""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from flowers_jax import models

NUM_CLASSES = 5
# The float64 equality tests: small models, dropout on in the ViT so that its masks are checked.
SMALL = {'resnet18': {}, 'efficientnet_b0': {}, 'vit_b16': {'image_size': 32, 'dropout': 0.1}}
SIZE, BATCH = 32, 4
# Relative to each leaf's largest magnitude (`_max_rel_diff`). Measured: init, loss, logits,
# pre_logits and BatchNorm statistics bit-identical for all three; gradients bit-identical for
# ResNet-18 and ViT-B/16, 7e-14 for EfficientNet-B0 (6.6e-12 absolute, gradients up to 3e3).
RTOL = 1e-12
# Rematerialised units (one optimization barrier each under prevent_cse=True).
UNITS = {'resnet18': 4, 'efficientnet_b0': 7, 'vit_b16': 12}


def _options(name: str, size: int = SIZE) -> dict:
  return {'image_size': size} if name.startswith('vit') else {}


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize('name', models.names())
def test_every_model_has_the_remat_option_off_by_default(name):
  factory = models.spec(name).factory
  assert 'remat' in models.spec(name).options
  assert inspect.signature(factory).parameters['remat'].default is False
  assert models.create(name, NUM_CLASSES, remat=True, **_options(name)).remat is True


@pytest.mark.parametrize('name', models.names())
def test_remat_keeps_every_variable_path_shape_and_dtype(name):
  """The torchvision converter and the checkpoints address variables by path."""
  x = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
  trees = {}
  for remat in (False, True):
    model = models.create(name, NUM_CLASSES, remat=remat, **_options(name))
    trees[remat] = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), x)
  assert jax.tree.structure(trees[True]) == jax.tree.structure(trees[False])
  flat = {r: {'/'.join(k): (v.shape, v.dtype) for k, v in flatten_dict(t).items()}
          for r, t in trees.items()}
  assert flat[True] == flat[False]
  assert any(k.startswith(('params/layer1/', 'params/features/1/',
                           'params/encoder/layers/encoder_layer_0/')) for k in flat[True])


def _max_rel_diff(a, b) -> float:
  """Largest |a - b| over the leaves of two trees, relative to the leaf's largest |a| but at
  least a thousandth of the tree's: some leaves are exactly 0 up to rounding (the gradient of a
  BatchNorm bias that another BatchNorm follows, EfficientNet's projections into a
  non-residual block: ~1e-13 where the tree's largest gradient is ~3e3)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  a, b = [[np.asarray(x) for x in jax.tree.leaves(t)] for t in (a, b)]
  assert [(x.shape, x.dtype) for x in a] == [(y.shape, y.dtype) for y in b]
  floor = 1e-3 * max((np.max(np.abs(x)) for x in a if x.size), default=0.0)
  worst = 0.0
  for x, y in zip(a, b):
    if not x.size:
      continue
    diff, scale = np.max(np.abs(x - y)), max(np.max(np.abs(x)), floor)
    worst = max(worst, diff / scale if scale else (0.0 if diff == 0 else np.inf))
  return float(worst)


def _train_outputs(name: str, remat: bool, x, labels):
  """(initial variables, loss, (logits, pre_logits, new batch_stats), param gradients)."""
  model = models.create(name, NUM_CLASSES, dtype=jnp.float64, remat=remat, **SMALL[name])
  variables = jax.jit(model.init)(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)

  @jax.jit
  def grads(variables, x, labels, key):
    def loss(params):
      (logits, out), state = model.apply(
          {**variables, 'params': params}, x, True, bn_train=True, mutable=['batch_stats'],
          rngs={'dropout': key})
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return ce, (logits, out['pre_logits'], state.get('batch_stats', {}))
    return jax.value_and_grad(loss, has_aux=True)(variables['params'])

  (loss, aux), g = grads(variables, x, labels, jax.random.key(1))
  return variables, loss, aux, g


# EfficientNet-B0 in float64 compiles for ~55 s on 2 CPU cores: `make test-all` runs it.
@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n.startswith(
    'efficientnet') else n for n in sorted(SMALL)])
def test_remat_gives_the_same_numbers_in_float64(name, x64):
  """train=True, bn_train=True, dropout / stochastic depth on: the same init, logits,
  pre_logits, updated BatchNorm statistics, loss and gradients with remat on and off."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, SIZE, SIZE, 3)))
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH))
  plain = _train_outputs(name, False, x, labels)
  remat = _train_outputs(name, True, x, labels)
  assert jax.tree.leaves(plain[2][0])[0].dtype == jnp.float64
  assert jax.tree.leaves(plain[3])[0].dtype == jnp.float64
  # Same random init (the rng path of every parameter is unchanged).
  assert _max_rel_diff(plain[0], remat[0]) == 0.0
  assert _max_rel_diff(plain[1:3], remat[1:3]) <= RTOL   # loss, logits, pre_logits, stats
  assert _max_rel_diff(plain[3], remat[3]) <= RTOL       # gradients w.r.t. every param
  if 'batch_stats' in plain[0]:  # the statistics did move (the comparison is not vacuous)
    assert _max_rel_diff(plain[0]['batch_stats'], plain[2][2]) > 1e-3


def _loss_fn(model):
  def loss(params, batch_stats, x, key):
    variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
    (logits, _), _ = model.apply(variables, x, True, bn_train=True, mutable=['batch_stats'],
                                 rngs={'dropout': key})
    return jnp.mean(logits ** 2)
  return loss


def _abstract(name: str, remat: bool, batch: int, size: int):
  """(loss(params, batch_stats, x, key), its abstract arguments) of `name` in float32."""
  model = models.create(name, NUM_CLASSES, remat=remat, **_options(name, size))
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  key = jax.eval_shape(lambda: jax.random.key(1))
  return _loss_fn(model), (variables['params'], variables.get('batch_stats', {}), x, key)


def _residual_bytes(name: str, remat: bool, batch: int, size: int) -> int:
  """Bytes `jax.vjp` keeps from the forward for the backward pass (params included)."""
  loss, args = _abstract(name, remat, batch, size)
  residuals = jax.eval_shape(
      lambda p, *rest: jax.vjp(lambda p: loss(p, *rest), p)[1], *args)
  return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in jax.tree.leaves(residuals))


# (batch, size, largest ratio remat / plain). Measured (float32, 224 px, batch 8): ViT-B/16
# 398 / 2237 MiB = 0.18, ResNet-18 168 / 363 MiB = 0.46 (the stem outside the stages keeps its
# ~100 MiB), EfficientNet-B0 114 / 2208 MiB = 0.05; both keep the params (ViT 327 MiB, ResNet
# 45 MiB, EfficientNet 16 MiB).
RESIDUALS = {'vit_b16': (8, 224, 0.3), 'resnet18': (8, 224, 0.6),
             'efficientnet_b0': (8, 224, 0.15)}


@pytest.mark.parametrize('name', sorted(RESIDUALS))
def test_remat_keeps_only_block_inputs_for_the_backward_pass(name):
  batch, size, bound = RESIDUALS[name]
  ratio = (_residual_bytes(name, True, batch, size) /
           _residual_bytes(name, False, batch, size))
  assert ratio < bound, ratio


def _op_counts(name: str, remat: bool) -> tuple[int, int]:
  """(dot_general + convolution ops, optimization barriers) of the lowered gradient."""
  loss, args = _abstract(name, remat, 2, SIZE)
  text = jax.jit(jax.grad(loss)).lower(*args).as_text()
  ops = len(re.findall(r'stablehlo\.(dot_general|convolution)\b', text))
  return ops, len(re.findall(r'stablehlo\.optimization_barrier\b', text))


# Matmuls / convs of one rematerialised unit's forward that its backward needs again, at least.
# Measured in the lowered gradient: ResNet-18 62 -> 81 ops, EfficientNet-B0 197 -> 260, ViT-B/16
# 293 -> 377 (7 of a block's 8 matmuls: the output of the last MLP matmul is not needed).
RECOMPUTED_PER_UNIT = {'resnet18': 4, 'efficientnet_b0': 2, 'vit_b16': 6}


@pytest.mark.parametrize('name', sorted(UNITS))
def test_remat_recomputes_each_unit_in_the_backward_pass(name):
  """One CSE barrier per rematerialised unit (prevent_cse) and its matmuls / convs twice."""
  (plain_ops, plain_barriers), (remat_ops, remat_barriers) = (
      _op_counts(name, False), _op_counts(name, True))
  assert plain_barriers == 0
  assert remat_barriers == UNITS[name]
  assert remat_ops - plain_ops >= UNITS[name] * RECOMPUTED_PER_UNIT[name], (plain_ops, remat_ops)


@pytest.mark.skipif(jax.default_backend() == 'cpu',
                    reason='XLA:CPU expands the remat barriers before its last CSE, which '
                           'merges the recomputation back: no saving to measure on CPU')
def test_remat_shrinks_xla_temp_buffers_of_the_vit_gradient():
  """GPU / TPU: the compiled gradient's temporaries (activations kept for the backward pass)."""
  temp = {}
  for remat in (False, True):
    loss, args = _abstract('vit_b16', remat, 8, 224)
    compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[True] < 0.6 * temp[False], temp
