"""The recipe keys wired through the train step and the real loop: mixup / cutmix in the
step, EMA weights updated, evaluated and saved, durations in steps, validation and `latest`
on their cadence, the tested checkpoint. The modules themselves are tested against timm in
test_mixing.py and test_ema.py."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import test_train
from flowers_jax import checkpoint, config as config_lib, ema, mixing, models, steps, train
from test_train import data_dir  # noqa: F401 - the fixture
from tree_util import flat


def _cfg(**overrides):
  return ml_collections.ConfigDict({**config_lib.BASE['train'], **overrides})


@pytest.fixture(scope='module')
def small():
  model = models.create('resnet18', num_classes=4)
  variables = jax.device_get(model.init({'params': jax.random.key(0)},
                                        jnp.zeros((1, 16, 16, 3)), train=False))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(0, 4, 8).astype(np.int32), 'mask': np.ones(8, np.float32)}
  return model, variables, batch


def test_mixup_cutmix_mix_the_batch_in_the_step(small):
  """The step's loss is the soft CE of the model on `mixing.mix_batch` of the batch with the
  step's own key (fold_in MIX_STREAM), targets smoothed; without mixing it is another number."""
  model, variables, batch = small
  cfg = _cfg(mixup=0.8, cutmix=1.0, mix_switch_prob=0.5, label_smoothing=0.1)
  tx = optax.sgd(0.0)
  state = steps.TrainState.create(variables, tx, seed=3)
  _, metrics = jax.jit(steps.make_train_step(model, tx, cfg, axis_name=None))(state, batch)
  key = jax.random.fold_in(steps._step_rng(state), steps.MIX_STREAM)
  images, targets = mixing.mix_batch(key, batch['image'], batch['label'], 4, mixup_alpha=0.8,
                                     cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
  assert not np.allclose(images, batch['image'])
  (logits, _), _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
  want = float(mixing.soft_cross_entropy(logits, targets))
  assert float(metrics['loss']) == pytest.approx(want, rel=1e-5)
  _, plain = jax.jit(steps.make_train_step(model, tx, _cfg(label_smoothing=0.1),
                                           axis_name=None))(state, batch)
  assert abs(float(plain['loss']) - want) > 1e-3


def test_ema_follows_timm_model_ema_v3_over_steps(small):
  """3 optimizer steps of 2 microbatches: the EMA is updated after each optimizer update only,
  with ModelEmaV3's warmup decay of that update's number (decay_at(1) = 0: a copy)."""
  model, variables, batch = small
  tx = steps.accumulating(optax.sgd(0.05), 2, variables['params'])
  cfg = _cfg(ema_decay=0.9, accum_steps=2)
  state = steps.TrainState.create(variables, tx, seed=0, ema=True)
  step = jax.jit(steps.make_train_step(model, tx, cfg, axis_name=None))
  want = state.ema
  for call in range(6):
    half = {k: v[(call % 2) * 4:(call % 2 + 1) * 4] for k, v in batch.items()}
    state, _ = step(state, half)
    if call % 2:
      decay = ema.decay_at((call + 1) // 2, decay=0.9)
      want = ema.update(want, {'params': state.params, 'batch_stats': state.batch_stats}, decay)
    for k, v in flat(want).items():
      np.testing.assert_allclose(flat(state.ema)[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
  raw = flat(state.params)
  assert max(np.abs(flat(state.ema['params'])[k] - raw[k]).max() for k in raw) > 1e-5


def test_a_run_in_steps_validates_and_saves_on_its_cadence(data_dir, tmp_path):  # noqa: F811
  """train.steps=5 (epochs ignored), validation every 2 steps and after the last, latest every
  step (two kept), the final state tested, EMA evaluated beside the raw weights and saved."""
  config = test_train.make_config(data_dir, **{
      'train.steps': 5, 'evals.every_steps': 2, 'train.checkpoint_every_steps': 1,
      'train.test_checkpoint': 'final', 'train.ema_decay': 0.5, 'train.epochs': 99})
  workdir = str(tmp_path / 'steps')
  results = train.train_and_evaluate(config, workdir)
  rows = test_train._read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [2, 4, 5]
  assert [r['images_seen'] for r in rows] == [16, 32, 40]
  assert [r['epoch'] for r in rows] == [round(2 / 3, 4), round(4 / 3, 4), round(5 / 3, 4)]
  assert all('val_ema_accuracy' in r for r in rows)
  assert all(0 <= r['input_wait_s'] < r['wall_time_s'] for r in rows)
  assert (results['steps'], results['validations'], results['tested_step']) == (5, 3, 5)
  assert 'test_ema_accuracy' in results
  for key in ('train_time_s', 'eval_time_s', 'checkpoint_wait_s', 'input_wait_s',
              'compile_time_s'):
    assert 0 <= results[key] < results['wall_time_s'], key
  latest = sorted(map(int, os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))))
  assert latest == [4, 5]
  like = test_train._setup(config)[2]
  like = steps.TrainState.create(like.variables, test_train._setup(config)[1], 0, ema=True)
  state, meta = checkpoint.Checkpointer(workdir).restore_latest(like)
  assert meta['step'] == 5
  p, e = flat(state.params), flat(state.ema['params'])
  assert max(np.abs(p[k] - e[k]).max() for k in p) > 1e-6  # the EMA is its own weights


def test_zero_head_through_the_run_s_initial_variables(data_dir):  # noqa: F811
  """`init.zero_head` zeros fc's kernel and bias (big_vision's transfer) and nothing else."""
  plain = test_train.make_config(data_dir)
  zeroed = test_train.make_config(data_dir, **{'init.zero_head': True})
  model = train.create_model(plain)
  a = flat(train.initial_variables(plain, model, 16)['params'])
  b = flat(train.initial_variables(zeroed, model, 16)['params'])
  assert {k for k in a if not np.array_equal(a[k], b[k])} == {'fc/kernel', 'fc/bias'}
  assert not b['fc/kernel'].any() and not b['fc/bias'].any() and a['fc/kernel'].any()
