"""EfficientNet-B0 (SE / ECA / ECA+spatial) against torchvision.models.efficientnet_b0.

The torch model has random weights (weights=None), every parameter perturbed and random
BatchNorm running statistics, so that each mapped tensor changes the outputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax import convert, models
from flowers_jax.models import efficientnet

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

TOL = 1e-4
NUM_PARAMS = 5_288_548


def _perturbed_torch_model(**kwargs):
  from torch_util import perturbed
  return perturbed(lambda: torchvision.models.efficientnet_b0(weights=None, **kwargs))


@pytest.fixture(scope='module')
def torch_model():
  return _perturbed_torch_model()


@pytest.fixture(scope='module')
def state_dict(torch_model):
  return {k: v.numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope='module')
def converted(state_dict):
  return convert.torchvision_to_flax('efficientnet_b0', state_dict)


def _torch_features(model, x_nhwc):
  """(logits, [features[i] output for i in 0..8]) as NHWC numpy arrays."""
  maps, hooks = {}, []
  for i, layer in enumerate(model.features):
    hooks.append(layer.register_forward_hook(
        lambda m, inp, out, i=i: maps.__setitem__(i, out.permute(0, 2, 3, 1).numpy())))
  with torch.no_grad():
    logits = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()
  for h in hooks:
    h.remove()
  return logits, [maps[i] for i in range(len(maps))]


def _is_feature_block(module, method):
  return method == '__call__' and len(module.path) == 2 and module.path[0] == 'features'


@functools.partial(jax.jit, static_argnums=0)
def _flax_features(model, variables, x):
  (logits, _), state = model.apply(variables, x, capture_intermediates=_is_feature_block,
                                   mutable=['intermediates'])
  feats = state['intermediates']['features']
  return logits, [feats[str(i)]['__call__'][0] for i in range(len(feats))]


@pytest.mark.parametrize('size', [(224, 224), (160, 200)])
def test_logits_and_every_stage_match_torchvision(torch_model, converted, size):
  variables, _ = converted
  x = np.random.RandomState(0).randn(2, *size, 3).astype(np.float32)
  expected_logits, expected_maps = _torch_features(torch_model, x)
  logits, maps = _flax_features(models.create('efficientnet_b0'), variables, x)
  assert len(maps) == len(expected_maps) == 9
  for i, (got, want) in enumerate(zip(maps, expected_maps)):
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f'{size} features[{i}] {want.shape}: max abs diff {diff:.2e} '
          f'(max abs {np.abs(want).max():.2f})')
    assert got.shape == want.shape and diff < TOL, f'features[{i}]'
  diff = float(np.abs(np.asarray(logits) - expected_logits).max())
  print(f'{size} logits: max abs diff {diff:.2e} (max abs {np.abs(expected_logits).max():.2f})')
  assert diff < TOL


def test_conversion_report_and_param_count(state_dict, converted):
  variables, report = converted
  assert sum(np.size(v) for v in jax.tree.leaves(variables['params'])) == NUM_PARAMS
  expected = sorted(k for k in state_dict if not k.endswith('num_batches_tracked'))
  assert sorted(report.loaded) == expected
  assert report.initialised == [] and report.dropped == []
  shapes = jax.eval_shape(lambda: models.create('efficientnet_b0').init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, shapes)


def test_round_trip_flax_torch_flax(state_dict, converted):
  variables, _ = converted
  back = convert.flax_to_torchvision('efficientnet_b0', variables)
  assert sorted(back) == sorted(k for k in state_dict if not k.endswith('num_batches_tracked'))
  for k, v in back.items():
    np.testing.assert_array_equal(v, state_dict[k], err_msg=k)
  again, _ = convert.torchvision_to_flax('efficientnet_b0', back)
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  fresh = torchvision.models.efficientnet_b0(weights=None)
  result = fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()},
                                 strict=False)
  # torch's BatchNorm fills the num_batches_tracked the converter drops: nothing else missing.
  assert result.missing_keys == [] and result.unexpected_keys == []
  for k, v in fresh.state_dict().items():
    if k in back:
      np.testing.assert_array_equal(v.numpy(), back[k], err_msg=k)


@pytest.mark.parametrize('attention', ['eca', 'eca_spatial'])
def test_eca_model_with_new_head_loads_everything_but_se_and_head(state_dict, attention):
  """The fine-tuning case: 1000-class torchvision SE weights -> 102-class ECA model."""
  variables, report = convert.torchvision_to_flax('efficientnet_b0', state_dict,
                                                  num_classes=102, attention=attention)
  se_keys = sorted(k for k in state_dict if '.fc1.' in k or '.fc2.' in k)
  head_keys = ['classifier.1.bias', 'classifier.1.weight']
  assert len(se_keys) == 16 * 4                          # one SE (2 convs with bias) per block
  assert sorted(report.dropped) == sorted(se_keys + head_keys)
  assert sorted(report.loaded) == sorted(
      k for k in state_dict
      if k not in se_keys + head_keys and not k.endswith('num_batches_tracked'))
  gate = {'eca': ['conv/kernel'],
          'eca_spatial': ['eca/conv/kernel', 'spatial/conv/bias', 'spatial/conv/kernel']}
  head = ['params/classifier/1/bias', 'params/classifier/1/kernel']
  gates = sorted(p for p in report.initialised if p not in head)
  assert sorted(set(report.initialised) - set(gates)) == head
  assert all(p.startswith('params/features/') for p in gates)
  assert sorted({p.split('/', 6)[-1] for p in gates}) == gate[attention]
  assert len(gates) == 16 * len(gate[attention])
  assert variables['params']['classifier']['1']['kernel'].shape == (1280, 102)
  # The gate sits on the expanded channels: kernel size from eca_kernel_size(expanded).
  for i, blocks in enumerate(efficientnet.block_configs()):
    for j, cfg in enumerate(blocks):
      node = variables['params']['features'][str(i + 1)][str(j)]['block']
      slot = node[str(2 if cfg.expand_ratio != 1 else 1)]
      kernel = slot['conv']['kernel'] if attention == 'eca' else slot['eca']['conv']['kernel']
      k = efficientnet.attention_lib.eca_kernel_size(cfg.expanded_channels)
      assert kernel.shape == (k, 1, 1)
  x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  model = models.create('efficientnet_b0', num_classes=102, attention=attention)
  logits, _ = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 102) and np.all(np.isfinite(logits))
  assert models.HEAD_PATTERNS['efficientnet_b0'] == r'^classifier/'


def test_train_mode_batch_stats_match_torch():
  """bn_train uses batch statistics like torch .train(); running means update alike."""
  torch_model = _perturbed_torch_model(dropout=0.0, stochastic_depth_prob=0.0).train()
  sd = {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}
  variables, _ = convert.torchvision_to_flax('efficientnet_b0', sd)
  x = np.random.RandomState(2).randn(4, 64, 64, 3).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  model = models.create('efficientnet_b0', dropout=0.0, stochastic_depth=0.0)
  (logits, _), updates = jax.jit(
      functools.partial(model.apply, train=True, mutable=['batch_stats']))(variables, x)
  diff = float(np.abs(np.asarray(logits) - expected).max())
  print(f'train-mode logits: max abs diff {diff:.2e}')
  assert diff < TOL
  new = convert.flax_to_torchvision('efficientnet_b0', {**variables, **updates})
  torch_new = torch_model.state_dict()
  for k in new:
    if k.endswith('running_mean'):   # torch's running_var uses the unbiased variance
      np.testing.assert_allclose(new[k], torch_new[k].numpy(), atol=1e-5, err_msg=k)


def test_dropout_and_stochastic_depth_only_in_train_mode(converted):
  variables, _ = converted
  model = models.create('efficientnet_b0')
  x = np.random.RandomState(3).randn(2, 32, 32, 3).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=1)
  def apply(seed, train):
    return model.apply(variables, x, train=train, bn_train=False,
                       rngs={'dropout': jax.random.PRNGKey(seed)})
  (eval0, out), (eval1, _) = apply(0, False), apply(1, False)
  np.testing.assert_array_equal(eval0, eval1)
  assert np.abs(apply(0, True)[0] - apply(1, True)[0]).max() > 1e-3
  emb = out['pre_logits']
  assert eval0.shape == (2, 1000) and emb.shape == (2, 1280) and emb.dtype == jnp.float32


def test_stochastic_depth_drops_whole_rows():
  x = jnp.ones((1000, 3, 3, 2))
  y = np.asarray(efficientnet.stochastic_depth(x, 0.25, jax.random.PRNGKey(0)))
  per_row = y.reshape(1000, -1)
  assert np.all((per_row == 0).all(1) | np.isclose(per_row, 1 / 0.75).all(1))
  assert abs((per_row[:, 0] == 0).mean() - 0.25) < 0.05
  np.testing.assert_array_equal(efficientnet.stochastic_depth(x, 0.25, None), x)
  probs = [b.stochastic_depth for s in efficientnet.block_configs() for b in s]
  np.testing.assert_allclose(probs, [0.2 * i / 16 for i in range(16)])


def test_bad_attention_option():
  with pytest.raises(ValueError, match="unknown attention='cbam'"):
    models.create('efficientnet_b0', attention='cbam').init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_bfloat16_compute_keeps_float32_params():
  model = models.create('efficientnet_b0', dtype=jnp.bfloat16, attention='eca_spatial')
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, out = jax.eval_shape(model.apply, variables, x)
  assert (logits.shape, logits.dtype) == ((2, 1000), jnp.float32)
  assert (out['pre_logits'].shape, out['pre_logits'].dtype) == ((2, 1280), jnp.float32)
