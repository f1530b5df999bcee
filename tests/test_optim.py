"""Optimizer, schedules and freezing masks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tree_util
from flowers_jax import config_utils, optim
from flowers_jax.config import base_config

HEAD = '^fc/'


def _params():
  rng = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      'conv1': {'kernel': n(3, 3, 3, 4)},
      'bn1': {'scale': n(4), 'bias': n(4)},
      'layer1': {'0': {'conv1': {'kernel': n(3, 3, 4, 4)}}},
      'layer2': {'0': {'conv1': {'kernel': n(3, 3, 4, 4)}}},
      'fc': {'kernel': n(4, 5), 'bias': n(5)},
  }


def _cfg(**kw):
  """`config.optim` of the base config: plain SGD at a constant lr 0.1, then `kw`."""
  cfg = base_config().optim
  cfg.update(dict(lr=0.1, momentum=0.0, weight_decay=0.0, schedule='constant'), **kw)
  return cfg


def _grads(params, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32),
      params)


# ------------------------------------------------------------------ masks ---


def test_param_paths_and_masks():
  params = _params()
  paths = tree_util.flat(optim.param_paths(params))
  assert paths['fc/bias'] == 'fc/bias'
  assert paths['layer1/0/conv1/kernel'] == 'layer1/0/conv1/kernel'

  backbone = tree_util.flat(optim.trainable_mask(params, 'backbone', HEAD))
  assert [p for p, t in backbone.items() if t] == ['fc/bias', 'fc/kernel']

  as_list = optim.trainable_mask(params, ['^conv1/', 'layer[1-3]/'])
  as_str = optim.trainable_mask(params, '^conv1/, layer[1-3]/')
  assert as_list == as_str
  assert sorted(p for p, t in tree_util.flat(as_str).items() if not t) == [
      'conv1/kernel', 'layer1/0/conv1/kernel', 'layer2/0/conv1/kernel']
  assert all(jax.tree.leaves(optim.trainable_mask(params, 'none')))

  assert optim.describe(params, optim.trainable_mask(params, 'backbone', HEAD)
                        ) == {'trainable': 25, 'frozen': 108 + 8 + 288,
                              'trainable_tensors': 2, 'frozen_tensors': 5,
                              'total': 25 + 108 + 8 + 288}


@pytest.mark.parametrize('freeze, head, match', [
    ('layer9/', None, "'layer9/' matches no parameter path"),
    (['^conv1/', 'nope'], None, "'nope' matches no"),
    ('.', None, 'freezes every parameter'),
    ('backbone', None, 'needs head_pattern'),
    ('backbone', '^head/', "'\\^head/' matches no"),
])
def test_freeze_errors(freeze, head, match):
  with pytest.raises(ValueError, match=match):
    optim.trainable_mask(_params(), freeze, head)


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="valid: \\['adamw', 'sgd'\\]"):
    optim.make_optimizer(_cfg(name='lamb'), _params(), total_steps=10)
  with pytest.raises(ValueError, match="'constant', 'cosine', 'step'"):
    optim.make_schedule(_cfg(schedule='poly'), 10)
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.make_schedule(_cfg(warmup_steps=10), 10)


# -------------------------------------------------------------- schedules ---


def test_schedule_values():
  s = optim.make_schedule(_cfg(schedule='cosine', warmup_steps=10), 110)
  np.testing.assert_allclose(
      [s(0), s(5), s(10), s(60), s(110)], [0.0, 0.05, 0.1, 0.05, 0.0],
      atol=1e-7)
  np.testing.assert_allclose(s(35), 0.05 * (1 + np.cos(np.pi / 4)), rtol=1e-5)

  s = optim.make_schedule(_cfg(schedule='step', warmup_steps=4,
                               step_boundaries=(0.5, 0.75)), 100)
  np.testing.assert_allclose(
      [s(0), s(2), s(4), s(49), s(50), s(74), s(75), s(99)],
      [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)

  s = optim.make_schedule(_cfg(schedule='constant'), 100)
  np.testing.assert_allclose([s(0), s(99)], [0.1, 0.1])


# -------------------------------------------------------------- optimizer ---


def _run(tx, params, steps=3):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, _grads(params, seed=i))
  return params, state


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_frozen_leaves_unchanged_and_stateless(name):
  params = _params()
  cfg = _cfg(name=name, momentum=0.9, weight_decay=1e-2, clip_norm=1.0)
  tx = optim.make_optimizer(cfg, params, total_steps=10,
                            freeze=['^conv1/', 'layer1/'], head_pattern=HEAD)
  new, state = _run(tx, params)
  mask = tree_util.flat(optim.trainable_mask(params, ['^conv1/', 'layer1/']))
  for path, p in tree_util.flat(params).items():
    changed = not np.array_equal(p, tree_util.flat(new)[path])
    assert changed == mask[path], path

  # Moment leaves exist for trainable params only; frozen ones are MaskedNode.
  n_trainable = sum(mask.values())
  moments = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert len(moments) == n_trainable * (1 if name == 'sgd' else 2)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  masked = jax.tree.leaves(state, is_leaf=is_masked)
  assert sum(map(is_masked, masked)) == (
      len(mask) - n_trainable) * (1 if name == 'sgd' else 2)


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
@pytest.mark.parametrize('decay_all', [False, True])
def test_weight_decay_skips_1d_params(name, decay_all):
  params = _params()
  cfg = _cfg(name=name, lr=0.5, weight_decay=0.1,
             decay_norm_and_bias=decay_all)
  tx = optim.make_optimizer(cfg, params, total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for path, u in tree_util.flat(updates).items():
    p = tree_util.flat(params)[path]
    decayed = decay_all or p.ndim > 1
    np.testing.assert_allclose(u, -0.05 * p if decayed else 0 * p,
                               rtol=1e-6, err_msg=path)


def test_clipping_uses_trainable_params_only():
  params = _params()
  mask = optim.trainable_mask(params, 'backbone', HEAD)
  tx = optim.make_optimizer(_cfg(lr=1.0, clip_norm=1.0), params,
                            total_steps=10, freeze='backbone',
                            head_pattern=HEAD)
  for target_norm in (0.5, 3.0):
    grads = _grads(params, scale=100.0)          # huge on frozen leaves
    head = np.sqrt(sum(np.sum(np.square(g)) for g in grads['fc'].values()))
    grads['fc'] = jax.tree.map(lambda g, f=target_norm / head: g * f, grads['fc'])
    updates, _ = tx.update(grads, tx.init(params), params)
    scale = min(1.0, 1.0 / target_norm)
    for path, u in tree_util.flat(updates).items():
      expected = -scale * tree_util.flat(grads)[path] if tree_util.flat(mask)[path] else 0.0
      np.testing.assert_allclose(u, expected, rtol=1e-5, err_msg=path)


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_matches_torch_optimizer(name):
  torch = pytest.importorskip('torch')
  params = _params()
  cfg = _cfg(name=name, lr=0.05, momentum=0.9, nesterov=True,
             weight_decay=0.1)
  new, _ = _run(optim.make_optimizer(cfg, params, total_steps=10), params)

  flat = tree_util.flat(params)
  tp = {k: torch.tensor(np.asarray(v), requires_grad=True)
        for k, v in flat.items()}
  groups = [{'params': [t for k, t in tp.items() if flat[k].ndim > 1]},
            {'params': [t for k, t in tp.items() if flat[k].ndim <= 1],
             'weight_decay': 0.0}]
  if name == 'sgd':
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=0.1)
  else:
    opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.1)
  for i in range(3):                # _grads depends on shapes and seed only
    g = tree_util.flat(_grads(params, seed=i))
    for k, t in tp.items():
      t.grad = torch.tensor(np.asarray(g[k]))
    opt.step()
  for k, v in tree_util.flat(new).items():
    np.testing.assert_allclose(v, tp[k].detach().numpy(), rtol=1e-5,
                               atol=1e-6, err_msg=k)


def test_vit_position_embedding_and_class_token_are_not_decayed():
  """torchvision's ViT recipe: no weight decay on pos_embedding / class_token (rank 3 leaves
  that the rank rule alone would decay); the rest of the encoder is decayed."""
  from flowers_jax import models
  spec = models.spec('vit_b16')
  params = {'class_token': jnp.ones((1, 1, 4)),
            'encoder': {'pos_embedding': jnp.ones((1, 5, 4)),
                        'layers': {'mlp': {'0': {'kernel': jnp.ones((4, 8))}}}}}
  tx = optim.make_optimizer(_cfg(name='adamw', lr=0.5, weight_decay=0.1), params, total_steps=10,
                            no_decay=spec.no_weight_decay)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat = tree_util.flat(updates)
  assert set(flat) == {'class_token', 'encoder/pos_embedding', 'encoder/layers/mlp/0/kernel'}
  np.testing.assert_array_equal(flat['class_token'], 0)
  np.testing.assert_array_equal(flat['encoder/pos_embedding'], 0)
  np.testing.assert_allclose(flat['encoder/layers/mlp/0/kernel'], -0.05, rtol=1e-6)


def test_benchmark_namespace_of_base_builds_the_same_optimizer():
  """scripts/benchmarks passes `BASE` as plain namespaces (no ml_collections on its GPU host)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  common = config_utils.load_module(os.path.join(root, 'scripts', 'benchmarks', '_common.py'))
  config = common.base_namespace()
  assert vars(config.optim) == base_config().optim.to_dict()
  assert config.optim.momentum > 0 and config.optim.weight_decay > 0  # both paths exercised
  params = _params()
  new, _ = _run(optim.make_optimizer(config.optim, params, total_steps=10), params)
  expected, _ = _run(optim.make_optimizer(base_config().optim, params, total_steps=10), params)
  for path, p in tree_util.flat(new).items():
    np.testing.assert_allclose(p, tree_util.flat(expected)[path], rtol=1e-6, err_msg=path)
    assert not np.array_equal(p, tree_util.flat(params)[path]), path
