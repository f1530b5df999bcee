"""Every variant of every config file (`strong` included) builds its model and runs one train step.

One jitted `steps.make_train_step` per variant on 4 random images at 32 px, with the variant's
own loss (triplets, P x K labels), freezing, BatchNorm mode, dtype and optimizer. Compiling
dominates (15-90 s per variant on 2 busy cores, ViT-B/16 and EfficientNet-B0 the most), so
`make test` runs the `FAST` ones, one per code path (frozen head with BatchNorm, bfloat16 + step
schedule, deformable conv; the demo config's own path runs through the whole loop in
test_train, test_cli and test_predict); the rest are marked slow: `make test-all`, or
`pytest -m slow tests/test_variants.py`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax import config_utils, losses, models, optim, steps, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = ('resnet18', 'demo', 'efficientnet_b0', 'vit_b16')
FAST = {('resnet18', 'frozen'), ('resnet18', 'strong'), ('resnet18', 'deform_parallel_conv1')}
SIZE, BATCH = 32, 4


def config_file(name: str):
  return config_utils.load_module(os.path.join(ROOT, 'configs', f'{name}.py'))


def _cases():
  for name in CONFIGS:
    for variant in config_file(name).VARIANTS:
      marks = [] if (name, variant) in FAST else [pytest.mark.slow]
      yield pytest.param(name, variant, marks=marks, id=f'{name}:{variant}')


def test_every_config_has_a_strong_variant():
  for name in ('resnet18', 'efficientnet_b0', 'vit_b16'):
    assert 'strong' in config_file(name).VARIANTS, name


def _batch(train_cfg, rng: np.random.Generator) -> dict:
  """4 images of 2 classes x 2 (a P x K batch for tcel_hard), with triplets where needed."""
  image = lambda: rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)  # noqa: E731
  batch = {'image': image(), 'label': np.array([0, 0, 1, 1], np.int32),
           'mask': np.ones(BATCH, np.float32)}
  for key in losses.get(train_cfg.loss).extra_inputs:
    batch[key] = image()
  if 'negative' in batch:
    batch['negative_label'] = np.array([1, 1, 0, 0], np.int32)
  return batch


@pytest.mark.parametrize('name,variant', list(_cases()))
def test_variant_runs_one_train_step(name, variant):
  config = config_file(name).get_config(variant)
  config.data.image_size = SIZE  # ViT: model.image_size follows it
  config.train.pk_k = 2
  model = train.create_model(config)
  x = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
  variables = jax.jit(lambda: model.init({'params': jax.random.key(0),
                                          'dropout': jax.random.key(1)}, x, train=False))()
  head = models.HEAD_PATTERNS[config.model.name]
  tx = optim.make_optimizer(config.optim, variables['params'],
                            total_steps=config.optim.warmup_steps + 2,
                            freeze=config.train.freeze, head_pattern=head)
  state = steps.TrainState.create(variables, tx, config.seed)
  step = steps.make_train_step(model, tx, config.train, axis_name=None,
                               bn_train=train.batchnorm_uses_batch_stats(config.train))
  new_state, metrics = jax.jit(step)(state, _batch(config.train, np.random.default_rng(0)))

  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics['loss'])), metrics
  assert float(metrics['count']) == BATCH
  mask = optim.trainable_mask(variables['params'], config.train.freeze, head)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       state.params, new_state.params)
  if config.optim.warmup_steps == 0:  # with a warmup, step 0's learning rate is 0
    assert any(jax.tree.leaves(moved)), 'no parameter changed'
  frozen_moved = [m for m, t in zip(jax.tree.leaves(moved), jax.tree.leaves(mask)) if not t]
  assert not any(frozen_moved), 'a frozen parameter changed'
