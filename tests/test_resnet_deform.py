"""ResNet18 with deformable convolutions: loading torchvision weights, init schemes, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax import convert
from flowers_jax import models
from flowers_jax.models import resnet

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 102
DEFORM_MODULES = {'after_conv1': {'deform_after_conv1'},
                  'parallel_conv1': {'deform_parallel_conv1'},
                  'every_stage': {f'layer{i}_deform' for i in range(1, 5)}}
SHAPES = [(2, 64, 64, 3), (1, 160, 200, 3)]


@pytest.fixture(scope='module')
def state_dict():
  """torchvision resnet18 with random weights and non-trivial BatchNorm statistics."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.bias.data.normal_(0, 0.2)
      m.running_mean.data.normal_(0, 0.2)
      m.running_var.data.uniform_(1, 2)
  return model.state_dict()


@pytest.fixture(scope='module')
def plain(state_dict):
  """Plain ResNet18 variables (102-class head) and its jitted apply."""
  variables, _ = convert.torchvision_to_flax('resnet18', state_dict, num_classes=NUM_CLASSES)
  return variables, jitted_logits(models.create('resnet18', NUM_CLASSES))


def jitted_logits(model):
  """jit of (variables, x [B, H, W, 3]) -> logits [B, NUM_CLASSES] (eval mode)."""
  return jax.jit(lambda variables, x: model.apply(variables, x)[0])


def images(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def convert_variant(state_dict, plain_variables, deform, deform_init):
  """Converted variables of a deform variant, with the plain model's (fresh) head."""
  variables, report = convert.torchvision_to_flax(
      'resnet18', state_dict, num_classes=NUM_CLASSES, deform=deform, deform_init=deform_init)
  variables['params']['fc'] = plain_variables['params']['fc']
  model = models.create('resnet18', NUM_CLASSES, deform=deform, deform_init=deform_init)
  return model, variables, report


@pytest.mark.parametrize('deform', sorted(DEFORM_MODULES))
def test_pretrained_init_loads_torchvision_and_equals_plain_resnet18(deform, state_dict, plain):
  plain_variables, plain_apply = plain
  model, variables, report = convert_variant(state_dict, plain_variables, deform, 'pretrained')
  expected_loaded = [k for k in state_dict
                     if not k.startswith('fc.') and not k.endswith('num_batches_tracked')]
  assert sorted(report.loaded) == sorted(expected_loaded)
  assert sorted(report.dropped) == ['fc.bias', 'fc.weight']
  # Only the head and the deformable layers (no torchvision names) are initialised.
  assert {p.split('/')[1] for p in report.initialised} == {'fc'} | DEFORM_MODULES[deform]
  apply = jitted_logits(model)
  for shape in SHAPES:
    x = images(shape)
    logits, ref = apply(variables, x), plain_apply(plain_variables, x)
    assert logits.shape == (shape[0], NUM_CLASSES)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4, err_msg=f'{deform} {shape}')


@pytest.mark.parametrize('deform', sorted(DEFORM_MODULES))
def test_random_init_changes_the_function(deform, state_dict, plain):
  plain_variables, plain_apply = plain
  model, variables, report = convert_variant(state_dict, plain_variables, deform, 'random')
  assert {p.split('/')[1] for p in report.initialised} == {'fc'} | DEFORM_MODULES[deform]
  name = sorted(DEFORM_MODULES[deform])[0]
  kernel = variables['params'][name]['kernel']
  bound = 1 / np.sqrt(np.prod(kernel.shape[:3]))  # torch DeformConv2d: U(+-1/sqrt(fan_in))
  assert bound / 2 < np.abs(kernel).max() <= bound
  assert np.abs(variables['params'][name]['offset']['kernel']).max() == 0
  x = images(SHAPES[0])
  diff = np.abs(jitted_logits(model)(variables, x) - plain_apply(plain_variables, x)).max()
  assert diff > 1e-2, diff


def _offset_kernel_grads(model, variables, name):
  """d(cross-entropy)/d(offset predictor kernel) of one train-mode batch: [kh, kw, C, 2K]."""
  x, labels = images((2, 64, 64, 3), seed=1), jnp.array([3, 7])

  def loss(params):
    (logits, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                 mutable=['batch_stats'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  grads = jax.jit(jax.grad(loss))(variables['params'])
  return np.asarray(grads[name]['offset']['kernel']), grads


def test_offset_predictor_gets_gradients_at_pretrained_init(state_dict, plain):
  # parallel_conv1: the branch kernel is half of conv1, so every tap's offsets get
  # gradient at step 0, and both halves of conv1 get (equal) gradients.
  model, variables, _ = convert_variant(state_dict, plain[0], 'parallel_conv1', 'pretrained')
  offset_grads, grads = _offset_kernel_grads(model, variables, 'deform_parallel_conv1')
  per_tap = np.abs(offset_grads).reshape(-1, 49, 2).max(axis=0)  # [K, (dy, dx)]
  assert per_tap.min() > 0, per_tap
  np.testing.assert_array_equal(variables['params']['conv1']['kernel'],
                                variables['params']['deform_parallel_conv1']['kernel'])
  assert np.abs(grads['deform_parallel_conv1']['kernel']).max() > 0
  assert np.abs(grads['conv1']['kernel']).max() > 0

  # after_conv1 (identity init): only the centre tap has a non-zero kernel, so only its
  # offsets (predictor output channels 2*4, 2*4+1) get gradient, through the image
  # gradient at the sample point; the other 8 taps' offsets get exactly 0 until the
  # kernel, which does get gradient, grows weights there. So the offsets start to
  # learn after the first steps rather than at step 0 -- harmless, and the price of
  # starting exactly at the pretrained function.
  model, variables, _ = convert_variant(state_dict, plain[0], 'after_conv1', 'pretrained')
  offset_grads, grads = _offset_kernel_grads(model, variables, 'deform_after_conv1')
  per_tap = np.abs(offset_grads).reshape(-1, 9, 2).max(axis=0)
  assert per_tap[4].min() > 0, per_tap
  assert np.delete(per_tap, 4, axis=0).max() == 0, per_tap
  assert np.abs(grads['deform_after_conv1']['kernel']).max() > 0


def test_converted_checkpoint_round_trips_without_splitting_conv1_again(state_dict, plain):
  options = dict(deform='parallel_conv1', deform_init='pretrained')
  _, variables, _ = convert_variant(state_dict, plain[0], **options)
  exported = convert.flax_to_torchvision('resnet18', variables, **options)
  assert 'deform_parallel_conv1.weight' in exported and 'conv1.weight' in exported
  again, report = convert.torchvision_to_flax('resnet18', exported, **options)
  assert report.initialised == [] and report.dropped == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


def test_bfloat16_deform_variant_keeps_float32_params():
  model = models.create('resnet18', NUM_CLASSES, dtype=jnp.bfloat16, deform='parallel_conv1')
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.PRNGKey(0), x)
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype('float32')}
  logits, out = jax.eval_shape(model.apply, variables, x)
  assert logits.dtype == out['pre_logits'].dtype == jnp.float32


def test_identity_kernel_init_is_the_identity_conv():
  kernel = resnet.identity_kernel_init(None, (3, 3, 4, 4))
  x = images((1, 5, 6, 4))
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1)] * 2,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(y, x)
  with pytest.raises(ValueError, match='C_in == C_out'):
    resnet.identity_kernel_init(None, (3, 3, 4, 8))
