"""ResNet parity with torchvision (random weights, float32, CPU) and the model registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax import convert
from flowers_jax import models

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

TOL = 1e-4  # measured ~4e-6 for the logits


def randomise_batchnorm(module, generator):
  """Non-trivial BN affine params and running stats, so that the tests can see them.

  running_var >= 1 keeps activations O(1) through the stack (max ~6 in ResNet-18 at 224),
  so absolute tolerances stay meaningful.
  """
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      c = m.num_features
      m.weight.data = 1 + 0.2 * torch.randn(c, generator=generator)
      m.bias.data = 0.2 * torch.randn(c, generator=generator)
      m.running_mean.data = 0.2 * torch.randn(c, generator=generator)
      m.running_var.data = 1 + torch.rand(c, generator=generator)


@pytest.fixture(scope='module')
def torch_resnet18():
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None)
  randomise_batchnorm(model, torch.Generator().manual_seed(1))
  return model.eval()


@pytest.fixture(scope='module')
def flax_resnet18(torch_resnet18):
  variables, report = convert.torchvision_to_flax('resnet18', torch_resnet18.state_dict())
  assert not report.initialised and not report.dropped
  return models.create('resnet18'), variables


def images(shape, seed=0):
  """[B, 3, H, W] float32 numpy, and the same as NHWC."""
  x = np.random.RandomState(seed).randn(*shape).astype(np.float32)
  return x, x.transpose(0, 2, 3, 1)


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_feature_maps(model, x):
  """Outputs of conv1, bn1, maxpool and every block, captured with forward hooks."""
  names = ['conv1', 'bn1', 'maxpool'] + [
      f'layer{i}.{j}' for i in range(1, 5) for j in range(len(getattr(model, f'layer{i}')))]
  maps, hooks = {}, []
  for name in names:
    # clone: torchvision's ReLU(inplace=True) overwrites bn1's output afterwards.
    hook = lambda _, __, out, name=name: maps.__setitem__(name, nhwc(out.clone()))
    hooks.append(model.get_submodule(name).register_forward_hook(hook))
  with torch.no_grad():
    logits = model(torch.from_numpy(x)).numpy()
  for h in hooks:
    h.remove()
  return logits, maps


def flax_feature_maps(model, variables, x):
  apply = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                    mutable=['intermediates']))
  (logits, _), state = apply(variables, jnp.asarray(x))
  inter = state['intermediates']
  maps = {'conv1': inter['conv1']['__call__'][0], 'bn1': inter['bn1']['__call__'][0],
          'maxpool': inter['stem'][0]}
  for stage in range(1, 5):
    for block, out in inter[f'layer{stage}'].items():
      if block != '__call__':
        maps[f'layer{stage}.{block}'] = out['__call__'][0]
  return np.asarray(logits), {k: np.asarray(v) for k, v in maps.items()}


def test_logits_and_every_block_match_torchvision(torch_resnet18, flax_resnet18):
  x_torch, x_flax = images((2, 3, 224, 224))
  ref_logits, ref_maps = torch_feature_maps(torch_resnet18, x_torch)
  logits, maps = flax_feature_maps(*flax_resnet18, x_flax)
  assert sorted(maps) == sorted(ref_maps) and len(maps) == 3 + 8
  diffs = {k: float(np.abs(maps[k] - ref_maps[k]).max()) for k in ref_maps}
  diffs['logits'] = float(np.abs(logits - ref_logits).max())
  print('max abs diff vs torchvision:', {k: f'{v:.1e}' for k, v in diffs.items()})
  assert np.abs(ref_logits).max() > 0.1  # the comparison is not between zeros
  for name, diff in diffs.items():
    assert diff < TOL, (name, diff)


def test_non_square_input_matches_torchvision(torch_resnet18, flax_resnet18):
  x_torch, x_flax = images((2, 3, 160, 200), seed=1)
  ref_logits, ref_maps = torch_feature_maps(torch_resnet18, x_torch)
  logits, maps = flax_feature_maps(*flax_resnet18, x_flax)
  assert maps['layer4.1'].shape == ref_maps['layer4.1'].shape == (2, 5, 7, 512)
  diff = np.abs(logits - ref_logits).max()
  print(f'160x200 logits max abs diff: {diff:.1e}')
  assert diff < TOL


def test_train_mode_batchnorm_step_matches_torchvision(torch_resnet18, flax_resnet18):
  model, variables = flax_resnet18
  batch, image = 2, 64
  x_torch, x_flax = images((batch, 3, image, image), seed=2)
  reference = torchvision.models.resnet18(weights=None)
  reference.load_state_dict(torch_resnet18.state_dict())
  reference.train()
  with torch.no_grad():
    ref_logits = reference(torch.from_numpy(x_torch)).numpy()
  apply = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  (logits, out), updates = apply(variables, jnp.asarray(x_flax))
  assert out['pre_logits'].shape == (batch, 512)
  diff = np.abs(np.asarray(logits) - ref_logits).max()
  print(f'train-mode logits max abs diff: {diff:.1e}')
  assert diff < TOL

  # Running statistics after one step, compared as they are (no correction): momentum 0.1 in
  # torch = 0.9 in Flax, and the running variance takes the unbiased batch variance
  # (x n/(n-1)) like torch's. At 64 px layer4's maps are 2x2, so n = 8 there and a biased
  # update would be off by 8/7.
  torch_stats = reference.state_dict()
  new = convert.flax_to_torchvision('resnet18', {**variables, **updates})
  worst = 0.0
  for key in (k for k in new if k.endswith(('running_mean', 'running_var'))):
    np.testing.assert_allclose(new[key], torch_stats[key].numpy(), rtol=1e-4, atol=1e-5,
                               err_msg=key)
    worst = max(worst, np.abs(new[key] - torch_stats[key].numpy()).max())
  print(f'running-stat max abs diff: {worst:.1e}')


def test_frozen_batchnorm_keeps_running_stats(flax_resnet18):
  model, variables = flax_resnet18
  _, x = images((2, 3, 64, 64))
  eval_logits, _ = model.apply(variables, x)
  (logits, _), updates = model.apply(variables, x, train=True, bn_train=False,
                                     mutable=['batch_stats'])
  np.testing.assert_array_equal(logits, eval_logits)
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates['batch_stats'],
                         variables['batch_stats'])


def test_bfloat16_compute_keeps_float32_params(flax_resnet18):
  _, variables = flax_resnet18
  _, x = images((2, 3, 32, 32))
  model = models.create('resnet18', dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype('float32')}
  logits, out = jax.jit(model.apply)(variables, x)
  assert logits.dtype == out['pre_logits'].dtype == jnp.float32
  ref, _ = jax.jit(models.create('resnet18').apply)(variables, x)
  scale = np.abs(ref).max()
  assert np.abs(logits - ref).max() < 0.1 * scale


def test_random_init_matches_torchvision():
  """A fresh model against a fresh torchvision resnet18(weights=None) (`layers/torch_init.py`):
  kaiming-normal fan-out convs' std within 5%, fc's U(+-1/sqrt(512)) bounds within 2%."""
  torch.manual_seed(0)
  reference = torchvision.models.resnet18(weights=None)
  expected = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = models.create('resnet18')
  got = convert.flax_to_torchvision(
      'resnet18', jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  for key in ('conv1.weight', 'layer1.0.conv1.weight', 'layer2.0.downsample.0.weight',
              'layer4.1.conv2.weight'):
    assert got[key].std() == pytest.approx(expected[key].std(), rel=0.05), key
    assert abs(got[key].mean()) < 0.05 * expected[key].std(), key
  for key in ('fc.weight', 'fc.bias'):
    bound = np.abs(expected[key]).max()
    assert bound == pytest.approx(512 ** -0.5, rel=0.02), key
    assert np.abs(got[key]).max() == pytest.approx(bound, rel=0.02), key
    assert got[key].std() == pytest.approx(expected[key].std(), rel=0.1), key


@pytest.mark.parametrize('name, num_params', [('resnet18', 11_689_512),
                                              ('resnet34', 21_797_672),
                                              ('resnet50', 25_557_032)])
def test_param_counts_match_torchvision(name, num_params):
  model = models.create(name)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(p.size for p in jax.tree_util.tree_leaves(params['params'])) == num_params
  tv = torchvision.models.get_model(name, weights=None)
  assert sum(p.numel() for p in tv.parameters()) == num_params


def test_resnet50_converts_and_matches_torchvision():
  torch.manual_seed(0)
  tv = torchvision.models.resnet50(weights=None).eval()
  randomise_batchnorm(tv, torch.Generator().manual_seed(1))
  variables, report = convert.torchvision_to_flax('resnet50', tv.state_dict())
  assert not report.initialised and not report.dropped
  x_torch, x_flax = images((2, 3, 32, 32))
  with torch.no_grad():
    ref = tv(torch.from_numpy(x_torch)).numpy()
  logits, out = jax.jit(models.create('resnet50').apply)(variables, x_flax)
  assert out['pre_logits'].shape == (2, 2048)
  diff = np.abs(logits - ref).max()
  print(f'resnet50 logits max abs diff: {diff:.1e}')
  assert diff < TOL


def test_registry_errors_name_the_valid_choices():
  assert {'resnet18', 'resnet34', 'resnet50'} <= set(models.names())
  assert models.HEAD_PATTERNS['resnet18'] == '^fc/'
  with pytest.raises(ValueError, match='resnet18'):
    models.create('resnet19')
  with pytest.raises(TypeError, match='deform_init'):
    models.create('resnet18', num_classes=10, deformable=True)


def test_deform_option_is_validated():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match='every_stage'):
    jax.eval_shape(models.create('resnet18', deform='everywhere').init,
                   jax.random.PRNGKey(0), x)
