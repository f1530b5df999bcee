"""Gradient accumulation (`train.accum_steps`): the same update as one large batch for models
without BatchNorm (float64), torch's per-microbatch BatchNorm for the others, and a resume
between two microbatches equal to the uninterrupted run (through the real loop)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import test_train
from flowers_jax import checkpoint, config as config_lib, models, steps, train
from flowers_jax.models import vit
from test_train import data_dir  # noqa: F401 - the fixture
from tree_util import flat

BATCH, ACCUM = 8, 4


def _train_cfg(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**config_lib.BASE['train'], **overrides})


def _float64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def _run(model, tx, cfg, variables, batches):
  state = steps.TrainState.create(variables, tx, seed=0)
  step = jax.jit(steps.make_train_step(model, tx, cfg, axis_name=None))
  for batch in batches:
    state, _ = step(state, batch)
  return state


def _batches(rng, n, size, num_classes, dtype):
  images = rng.normal(size=(n, BATCH, size, size, 3)).astype(dtype)
  labels = rng.integers(0, num_classes, size=(n, BATCH)).astype(np.int32)
  return [{'image': im, 'label': lb, 'mask': np.ones(BATCH, dtype)} for im, lb in
          zip(images, labels)]


def _micro(batches, accum):
  """Each batch as `accum` consecutive microbatches (the loop's stream does the same)."""
  m = BATCH // accum
  return [{k: v[i * m:(i + 1) * m] for k, v in b.items()} for b in batches
          for i in range(accum)]


def test_vit_accumulated_update_equals_the_large_batch_in_float64():
  """3 SGD-momentum steps (weight decay, cosine lr) of batch 8 vs 12 calls of 2 with accum_steps=4:
  the params agree to float64 precision (the mean of the 4 microbatch gradients is the
  batch's gradient)."""
  with jax.enable_x64(True):
    model = vit.VisionTransformer(num_classes=5, image_size=16, patch_size=8, hidden_dim=32,
                                  num_layers=2, num_heads=2, mlp_dim=64, dtype=jnp.float64)
    x = jnp.zeros((1, 16, 16, 3), jnp.float64)
    variables = _float64(model.init({'params': jax.random.key(0)}, x))
    schedule = optax.cosine_decay_schedule(0.1, 3)
    make_tx = lambda: optax.chain(optax.add_decayed_weights(0.05), optax.sgd(schedule, 0.9))
    batches = _batches(np.random.default_rng(0), 3, 16, 5, np.float64)
    whole = _run(model, make_tx(), _train_cfg(), variables, batches)
    tx = steps.accumulating(make_tx(), ACCUM, variables['params'])
    accum = _run(model, tx, _train_cfg(accum_steps=ACCUM),
                 variables, _micro(batches, ACCUM))
    assert int(accum.step) == 3 * ACCUM
    a, b = flat(whole.params), flat(accum.params)
    start = flat(variables['params'])
    moved = [k for k in a if np.abs(a[k] - start[k]).max() > 1e-6]
    assert len(moved) > 0.8 * len(a), sorted(set(a) - set(moved))  # the key biases do not
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_batchnorm_accumulation_normalises_each_microbatch_with_its_own_statistics():
  """ResNet18, accum_steps=2, one optimizer step (plain SGD): the update is the mean of the
  two microbatch gradients, each computed with the microbatch's own BatchNorm statistics, and
  the running statistics are updated twice (torch's loop of `loss.backward()` per
  microbatch, then `optimizer.step()`)."""
  with jax.enable_x64(True):
    model = models.create('resnet18', num_classes=4, dtype=jnp.float64)
    x = jnp.zeros((1, 16, 16, 3), jnp.float64)
    variables = _float64(model.init({'params': jax.random.key(0)}, x))
    batches = _micro(_batches(np.random.default_rng(1), 1, 16, 4, np.float64), 2)
    lr = 0.1
    tx = steps.accumulating(optax.sgd(lr), 2, variables['params'])
    state = _run(model, tx, _train_cfg(accum_steps=2),
                 variables, batches)

    def loss(params, stats, batch):
      (logits, _), upd = model.apply({'params': params, 'batch_stats': stats}, batch['image'],
                                     train=True, mutable=['batch_stats'])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, batch['label'][:, None], 1)), upd

    stats, grads = variables['batch_stats'], []
    for batch in batches:
      g, upd = jax.grad(loss, has_aux=True)(variables['params'], stats, batch)
      grads.append(g)
      stats = upd['batch_stats']
    want = jax.tree.map(lambda p, g0, g1: p - lr * (g0 + g1) / 2, variables['params'], *grads)
    for k, v in flat(want).items():
      np.testing.assert_allclose(flat(state.params)[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
    for k, v in flat(stats).items():
      np.testing.assert_allclose(flat(state.batch_stats)[k], v, rtol=1e-9, atol=1e-12,
                                 err_msg=k)
    # One statistic update only (the first microbatch's) is a different number.
    once = flat(jax.grad(loss, has_aux=True)(variables['params'], variables['batch_stats'],
                                             batches[0])[1]['batch_stats'])
    k = 'bn1/mean'
    assert np.abs(once[k] - flat(state.batch_stats)[k]).max() > 1e-6


def test_resume_between_two_microbatches_is_exact(data_dir, tmp_path):  # noqa: F811
  """accum_steps=2 through the real loop: a SIGTERM lands in the middle of an accumulation
  (an odd number of calls); the resumed run ends with the uninterrupted run's state."""
  config = test_train.make_config(data_dir, **{'train.accum_steps': 2})
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, full)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoint, 'stop_signal', test_train._sigterm_at_batch(4))
    with pytest.raises(SystemExit):
      train.train_and_evaluate(config, resumed)
  checkpoint.restore_signal_handlers()
  _, tx, target = test_train._setup(config)
  like = steps.TrainState.create(target.variables,
                                 steps.accumulating(tx, 2, target.params), config.seed)
  _, meta = checkpoint.Checkpointer(resumed).restore_latest(like)
  assert meta['calls'] % 2 == 1, meta  # stopped between the two microbatches of a step
  train.train_and_evaluate(config, resumed)
  checkpoint.restore_signal_handlers()
  (a, _), (b, _) = (checkpoint.Checkpointer(d).restore_latest(like) for d in (full, resumed))
  a, b = flat(a), flat(b)
  assert int(a['step']) == 2 * 2 * test_train.STEPS_PER_EPOCH
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  rows = [test_train._read_jsonl(os.path.join(d, 'metrics.jsonl')) for d in (full, resumed)]
  assert [test_train._untimed(r) for r in rows[0]] == [test_train._untimed(r) for r in rows[1]]
