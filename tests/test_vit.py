"""ViT-B/16, B/32 and L/16 against torchvision's vit_b_16 / vit_b_32 / vit_l_16 (random weights,
every parameter perturbed)."""

import functools
import re

import jax
import numpy as np
import pytest

from flowers_jax import convert, models
from flowers_jax.models import vit

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
F = torch.nn.functional

TOL = 1e-4
NUM_PARAMS = 86_567_656


def _perturbed_torch_model(builder='vit_b_16', image_size=224):
  """weights=None leaves the head, class token and biases at 0: perturb every tensor."""
  torch.manual_seed(0)
  model = torchvision.models.get_model(builder, weights=None, image_size=image_size)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope='module')
def torch_model():
  return _perturbed_torch_model()


@pytest.fixture(scope='module')
def state_dict(torch_model):
  return {k: v.numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope='module')
def converted(state_dict):
  return convert.torchvision_to_flax('vit_b16', state_dict)


def _is_encoder_layer(module, method):
  return method == '__call__' and module.path[:2] == ('encoder', 'layers') and len(module.path) == 3


@functools.partial(jax.jit, static_argnums=0)
def _flax_tokens(model, variables, x):
  (logits, _), state = model.apply(variables, x, capture_intermediates=_is_encoder_layer,
                                   mutable=['intermediates'])
  layers = state['intermediates']['encoder']['layers']
  return logits, [layers[f'encoder_layer_{i}']['__call__'][0] for i in range(len(layers))]


def _torch_tokens(torch_model, x):
  """torch's logits [B, C] and every encoder layer's output [B, N, D] for NHWC images x."""
  tokens = {}
  hooks = [layer.register_forward_hook(lambda m, i, out, n=n: tokens.__setitem__(n, out.numpy()))
           for n, layer in enumerate(torch_model.encoder.layers)]
  with torch.no_grad():
    logits = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  for h in hooks:
    h.remove()
  return logits, [tokens[n] for n in range(len(tokens))]


def _assert_matches_torch(torch_model, model, variables, x) -> float:
  """Every encoder layer's tokens and the logits of Flax `model` within TOL of torch's
  (eval mode) on NHWC images x; returns the logits' max abs diff."""
  expected, expected_layers = _torch_tokens(torch_model, x)
  logits, layers = _flax_tokens(model, variables, x)
  assert len(layers) == len(expected_layers) == model.num_layers
  for n, (got, want) in enumerate(zip(layers, expected_layers)):
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f'encoder_layer_{n} {want.shape}: max abs diff {diff:.2e} '
          f'(max abs {np.abs(want).max():.2f})')
    assert got.shape == want.shape and diff < TOL, f'encoder_layer_{n}'
  diff = float(np.abs(np.asarray(logits) - expected).max())
  print(f'logits: max abs diff {diff:.2e} (max abs {np.abs(expected).max():.2f})')
  assert diff < TOL
  return diff


def test_logits_and_every_encoder_layer_match_torchvision(torch_model, converted):
  variables, report = converted
  assert report.initialised == [] and report.dropped == []
  x = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  _assert_matches_torch(torch_model, models.create('vit_b16'), variables, x)


@pytest.mark.parametrize('name, image_size, via_file', [('vit_b32', 64, True),
                                                        ('vit_l16', 32, False)])
def test_other_sizes_match_torchvision(name, image_size, via_file, tmp_path):
  """torchvision's vit_b_32 / vit_l_16 built for a small image (2x2 patches, so ViT-L's
  300M parameters stay cheap), converted (vit_b32 from a saved .pth; vit_l16 from the state
  dict in memory, sparing CI 1.2 GB of disk), round-tripped and compared."""
  torch_model = _perturbed_torch_model(models.spec(name).torchvision, image_size)
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  source = torch_model.state_dict()
  if via_file:
    source = str(tmp_path / f'{name}.pth')
    torch.save(torch_model.state_dict(), source)
  variables, report = convert.torchvision_to_flax(name, source, image_size=image_size)
  assert report.initialised == [] and report.dropped == []
  assert sum(np.size(v) for v in jax.tree.leaves(variables['params'])) == sum(
      p.numel() for p in torch_model.parameters())
  x = np.random.RandomState(0).randn(2, image_size, image_size, 3).astype(np.float32)
  diff = _assert_matches_torch(torch_model, models.create(name, image_size=image_size),
                               variables, x)
  print(f'{name} at {image_size} px: logits max abs diff {diff:.2e}')
  back = convert.flax_to_torchvision(name, variables, image_size=image_size)
  assert sorted(back) == sorted(state_dict)
  for k, v in back.items():
    np.testing.assert_array_equal(v, state_dict[k], err_msg=k)


def test_param_count_and_round_trip(state_dict, converted):
  variables, _ = converted
  assert sum(np.size(v) for v in jax.tree.leaves(variables['params'])) == NUM_PARAMS
  p = variables['params']['encoder']['layers']['encoder_layer_0']['self_attention']
  assert p['query']['kernel'].shape == (768, 12, 64) and p['query']['bias'].shape == (12, 64)
  assert p['out']['kernel'].shape == (12, 64, 768)
  back = convert.flax_to_torchvision('vit_b16', variables)
  assert sorted(back) == sorted(state_dict)
  for k, v in back.items():
    np.testing.assert_array_equal(v, state_dict[k], err_msg=k)
  again, _ = convert.torchvision_to_flax('vit_b16', back)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_legacy_mlp_keys_load(state_dict, converted):
  legacy = {k.replace('.mlp.0.', '.mlp.linear_1.').replace('.mlp.3.', '.mlp.linear_2.'): v
            for k, v in state_dict.items()}
  assert sum('.mlp.linear_1.' in k for k in legacy) == 24
  variables, report = convert.torchvision_to_flax('vit_b16', legacy)
  assert report.dropped == [] and report.initialised == []
  jax.tree.map(np.testing.assert_array_equal, variables, converted[0])


def test_attention_rows_of_another_size_name_key_and_shapes():
  """The q/k/v split reshapes to the model's shapes: an L/16 row into B/32 fails with one line."""
  key = 'encoder.layers.encoder_layer_0.self_attention.in_proj_weight'
  with pytest.raises(ValueError, match=re.escape(f"'{key}' has shape (3072, 1024) but the model "
                                                 'expects (2304, 768)')):
    convert.torchvision_to_flax('vit_b32', {key: np.zeros((3072, 1024), np.float32)},
                                num_classes=10, allow_partial=True)


def _torch_resize(pos, grid, align_corners):
  """The reference: F.interpolate(bicubic) of the g x g grid, class token kept."""
  g = int(np.sqrt(pos.shape[1] - 1))
  img = torch.from_numpy(pos[:, 1:]).permute(0, 2, 1).reshape(1, -1, g, g)
  img = F.interpolate(img, size=grid, mode='bicubic', align_corners=align_corners)
  img = img.reshape(1, pos.shape[2], grid * grid).permute(0, 2, 1).numpy()
  return np.concatenate([pos[:, :1], img], axis=1)


@pytest.mark.parametrize('grid', [24, 10])  # 384 (up) and 160 (down) pixel inputs
@pytest.mark.parametrize('align_corners', [True, False])
def test_resize_pos_embedding_is_torch_bicubic(state_dict, grid, align_corners):
  pos = state_dict['encoder.pos_embedding']                 # [1, 197, 768]
  got = vit.resize_pos_embedding(pos, (1, grid * grid + 1, 768), align_corners=align_corners)
  np.testing.assert_allclose(got, _torch_resize(pos, grid, align_corners), atol=1e-6)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])
  with pytest.raises(ValueError, match='cannot resize'):
    vit.resize_pos_embedding(pos, (1, 100, 768))


def test_384_model_from_224_checkpoint_matches_torchvision_interpolation(state_dict):
  """torchvision's interpolate_embeddings + vit_b_16(image_size=384) is the reference."""
  variables, report = convert.torchvision_to_flax('vit_b16', state_dict, image_size=384)
  assert report.initialised == [] and report.dropped == []
  pos = np.asarray(variables['params']['encoder']['pos_embedding'])
  assert pos.shape == (1, 577, 768)
  np.testing.assert_allclose(pos, _torch_resize(state_dict['encoder.pos_embedding'], 24, True),
                             atol=1e-6)
  sd = torchvision.models.vision_transformer.interpolate_embeddings(
      384, 16, {k: torch.from_numpy(v) for k, v in state_dict.items()})
  torch_384 = torchvision.models.vit_b_16(weights=None, image_size=384).eval()
  torch_384.load_state_dict(sd)
  x = np.random.RandomState(1).randn(1, 384, 384, 3).astype(np.float32)
  with torch.no_grad():
    expected = torch_384(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  logits, _ = jax.jit(models.create('vit_b16', image_size=384).apply)(variables, x)
  diff = float(np.abs(np.asarray(logits) - expected).max())
  print(f'384x384 logits: max abs diff {diff:.2e} (max abs {np.abs(expected).max():.2f})')
  assert diff < TOL


def test_wrong_image_size_raises(converted):
  variables, _ = converted
  match = r'built for \[B, 224, 224, 3\].*got shape \(1, 384, 384, 3\)'
  with pytest.raises(ValueError, match=match):
    models.create('vit_b16').apply(variables, np.zeros((1, 384, 384, 3), np.float32))
  with pytest.raises(ValueError, match='multiple of the patch size'):
    models.create('vit_b16', image_size=200).init(jax.random.PRNGKey(0),
                                                   np.zeros((1, 200, 200, 3), np.float32))


@pytest.mark.parametrize('name, torchvision_name, width', [('vit_b16', 'vit_b_16', 768),
                                                           ('vit_b32', 'vit_b_32', 768),
                                                           ('vit_l16', 'vit_l_16', 1024)])
def test_pre_logits_head_pattern_and_no_weight_decay(name, torchvision_name, width):
  model = models.create(name, num_classes=7)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  logits, out = jax.eval_shape(model.apply, variables, x)
  assert (logits.shape, out['pre_logits'].shape) == ((2, 7), (2, width))
  assert logits.dtype == out['pre_logits'].dtype == np.float32
  spec = models.spec(name)
  assert models.HEAD_PATTERNS[name] == spec.head == r'^heads/'
  assert spec.no_weight_decay == vit.NO_WEIGHT_DECAY
  assert spec.torchvision == torchvision_name


def test_bfloat16_compute_keeps_float32_params():
  model = models.create('vit_b16', dtype=jax.numpy.bfloat16)
  x = np.zeros((1, 224, 224, 3), np.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
  assert jax.eval_shape(model.apply, variables, x)[0].dtype == np.float32


def _init_stats(values):
  """(std, mean, max |x|) of a list of arrays taken together."""
  x = np.concatenate([np.ravel(v) for v in values]).astype(np.float64)
  return x.std(), x.mean(), np.abs(x).max()


def _by_kind(state_dict):
  """{torch key with the layer index removed: [arrays of the 12 layers]}."""
  kinds = {}
  for key, value in state_dict.items():
    kinds.setdefault(re.sub(r'encoder_layer_\d+', 'encoder_layer_*', key), []).append(value)
  return kinds


def test_random_init_matches_torchvision():
  """Every leaf of a fresh model against a fresh torchvision vit_b_16(weights=None):
  std within 3%, mean within 5% of the std, and for U(-a, a) leaves the bound a within 2%;
  leaves torch sets to a constant (class token, biases, head, LayerNorm) equal to it."""
  torch.manual_seed(0)
  expected = _by_kind({k: v.numpy() for k, v in
                       torchvision.models.vit_b_16(weights=None).state_dict().items()})
  model = models.create('vit_b16')
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
  got = _by_kind(convert.flax_to_torchvision('vit_b16', variables))
  assert sorted(got) == sorted(expected)
  for kind, values in expected.items():
    std, mean, bound = _init_stats(values)
    our_std, our_mean, our_bound = _init_stats(got[kind])
    print(f'{kind}: std torch {std:.4g} ours {our_std:.4g}; '
          f'max |x| torch {bound:.4g} ours {our_bound:.4g}')
    if std == 0:
      np.testing.assert_array_equal(np.stack(got[kind]), np.stack(values), err_msg=kind)
      continue
    assert our_std == pytest.approx(std, rel=0.03), kind
    assert abs(our_mean - mean) < 0.05 * std, kind
    if bound / std < 2:  # uniform (bound = sqrt(3) std); normals reach 4-5 std
      assert our_bound == pytest.approx(bound, rel=0.02), kind
