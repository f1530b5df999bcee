"""Trains a small ResNet18 (or EfficientNet-B0 with dropout and stochastic depth) for a few steps
on a fixed global batch and saves its params.

Used by tests/test_parallel.py, in-process (single device, pmap, sharded on 4 fake devices) and
as 2 separate processes x 2 fake devices (multi-host, gloo collectives on 127.0.0.1):

  python tests/parallel_worker.py OUT --modes pmap,sharded --steps 2 \
      [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0 --local-devices 2]
"""

import argparse
import os

GLOBAL_BATCH = 8
IMAGE = 32


def make_config():
  """(config.train, config.optim): the base config's (CE; SGD momentum 0.9, lr 0.01, weight
  decay 1e-4) with a constant learning rate."""
  from flowers_jax.config import base_config
  c = base_config()
  c.optim.schedule = 'constant'
  return c.train, c.optim


def global_batch(step: int, image: int = IMAGE):
  import numpy as np
  rng = np.random.default_rng(step)
  return {
      'image': rng.normal(size=(GLOBAL_BATCH, image, image, 3)),
      'label': rng.integers(0, 5, size=(GLOBAL_BATCH,)).astype(np.int32),
      'mask': np.ones((GLOBAL_BATCH,), np.float32),
  }


MODELS = {  # name -> (create options, image size)
    'resnet18': ({}, IMAGE),
    # Heavy dropout and stochastic depth, so that a mask drawn per device would show.
    'efficientnet_b0': ({'dropout': 0.5, 'stochastic_depth': 0.5}, 32),
    'toy': ({'dropout': 0.5, 'stochastic_depth': 0.5}, 8),
}


def _toy_model(num_classes, bn_axis_name, dtype, dropout, stochastic_depth):
  """EfficientNet-B0's random layers in a model that compiles in a second: conv -> BatchNorm
  -> residual with stochastic depth -> pool -> dropout -> dense.

  [B, 8, 8, 3] -> (logits [B, num_classes], {'pre_logits': [B, 16]}), like the models.
  """
  import flax.linen as nn
  import jax.numpy as jnp
  from flowers_jax.models.layers import dropout as dropout_lib
  from flowers_jax.models.layers.norm import torch_batchnorm

  class Toy(nn.Module):
    @nn.compact
    def __call__(self, x, train=False, *, bn_train=None):
      bn_train = train if bn_train is None else bn_train
      norm = torch_batchnorm(running=not bn_train, axis_name=bn_axis_name, dtype=dtype)
      x = nn.relu(norm()(nn.Conv(16, (3, 3), dtype=dtype)(x)))
      y = nn.Conv(16, (3, 3), dtype=dtype)(x)
      rng = self.make_rng('dropout') if train else None
      x = x + dropout_lib.stochastic_depth(y, stochastic_depth, rng, bn_axis_name)
      emb = jnp.mean(x, axis=(1, 2))
      h = dropout_lib.Dropout(dropout, bn_axis_name)(emb, deterministic=not train)
      logits = nn.Dense(num_classes, dtype=dtype, name='head')(h)
      return logits, {'pre_logits': emb}

  return Toy()


def _create(name, **kwargs):
  from flowers_jax import models
  if name == 'toy':
    return _toy_model(**kwargs)
  return models.create(name, **kwargs)


def train(mode: str, num_steps: int, devices=None, model: str = 'resnet18',
          checkpoint_at: int | None = None, workdir: str | None = None,
          options: str | None = None):
  """Returns host numpy (params, batch_stats) after `num_steps` steps in `mode`, in float64.

  mode: 'single' (jit on one device, no collectives), 'pmap' or 'sharded'.
  checkpoint_at: save the state after that many steps to `workdir`, restore it into a freshly
  initialised state and go on from there (a resume in the middle of the run).
  options: the `MODELS` entry whose options and image size to use (default: `model`'s).
  float64 because in float32 the three modes add the batch up in different orders, and the
  gradients of BatchNorm biases (sums that nearly cancel) then differ by ~1e-5 relative after one
  step and by percents after three: noise that would hide the errors this test looks for.
  """
  import jax
  with jax.enable_x64(True):
    return _train(mode, num_steps, devices, model, checkpoint_at, workdir, options or model)


def _train(mode, num_steps, devices, model_name, checkpoint_at, workdir, options_name):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flowers_jax import checkpoint, models, optim, parallel, steps

  train_cfg, optim_cfg = make_config()
  strategy = None if mode == 'single' else parallel.make(mode, devices)
  axis = strategy.axis_name if strategy else None
  options, image = MODELS[options_name]
  model = _create(model_name, num_classes=5, bn_axis_name=axis, dtype=jnp.float64, **options)
  variables = model.init(jax.random.key(0), jnp.zeros((1, image, image, 3)), train=False)
  variables = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
  tx = optim.make_optimizer(optim_cfg, variables['params'], total_steps=max(num_steps, 1),
                            freeze='none',
                            head_pattern=models.HEAD_PATTERNS.get(model_name, '^head/'))
  fresh = steps.TrainState.create(variables, tx, seed=0)
  step_fn = steps.make_train_step(model, tx, train_cfg, axis_name=axis)
  p, n = jax.process_index(), jax.process_count()
  rows = slice(p * GLOBAL_BATCH // n, (p + 1) * GLOBAL_BATCH // n)
  if strategy is None:
    step_fn, put_state, get_state = jax.jit(step_fn), lambda s: s, jax.device_get
    put_batch = lambda i: global_batch(i, image)
  else:
    step_fn, put_state, get_state = (strategy.compile(step_fn), strategy.put_state,
                                     strategy.get_state)
    put_batch = lambda i: strategy.put_batch(
        {k: v[rows] for k, v in global_batch(i, image).items()})
  state = put_state(fresh)
  for i in range(num_steps):
    if i == checkpoint_at:
      ckpt = checkpoint.Checkpointer(workdir)
      ckpt.save_latest(i, get_state(state), {'step': i})
      state = put_state(checkpoint.Checkpointer(workdir).restore_latest(fresh)[0])
    state, _ = step_fn(state, put_batch(i))
  host_state = get_state(state)
  return host_state.params, host_state.batch_stats


def flatten(tree) -> dict:
  """{'a/b/c': numpy array}: tests/tree_util.py's `flat` (imported once main set XLA_FLAGS)."""
  from tree_util import flat
  return flat(tree)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('out', help='writes OUT_<mode>.npz per mode')
  ap.add_argument('--modes', default='pmap,sharded')
  ap.add_argument('--steps', type=int, default=2)
  ap.add_argument('--coordinator', default='')
  ap.add_argument('--num-processes', type=int, default=1)
  ap.add_argument('--process-id', type=int, default=0)
  ap.add_argument('--local-devices', type=int, default=4)
  a = ap.parse_args()
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={a.local_devices}'
  import numpy as np
  from flowers_jax import parallel
  parallel.initialize_distributed(a.coordinator, a.num_processes, a.process_id)
  import jax
  for mode in a.modes.split(','):
    params, stats = train(mode, a.steps)  # float64
    if jax.process_index() == 0:
      np.savez(f'{a.out}_{mode}.npz', **flatten({'params': params, 'batch_stats': stats}))
  print(f'process {jax.process_index()}/{jax.process_count()}: {jax.device_count()} devices, done')


if __name__ == '__main__':
  main()
