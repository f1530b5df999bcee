"""SE / ECA / spatial gates of flowers_jax.models.layers.attention against references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax.models.layers import attention

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

# Hand-computed: t = int(|(log2 C + 1) / 2|), k = t if odd else t + 1.
#   C=16: (4+1)/2=2.5 -> 2 -> 3      C=144: (7.17+1)/2=4.08 -> 4 -> 5
#   C=96: (6.58+1)/2=3.79 -> 3       C=672: (9.39+1)/2=5.19 -> 5
#   C=2048: (11+1)/2=6 -> 7          C=1: (0+1)/2=0.5 -> 0 -> 1
ECA_KERNELS = {1: 1, 2: 1, 8: 3, 16: 3, 24: 3, 32: 3, 40: 3, 80: 3, 96: 3, 127: 3,
               128: 5, 144: 5, 240: 5, 480: 5, 672: 5, 1152: 5, 2047: 5, 2048: 7}


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _x(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.mark.parametrize('channels,kernel', sorted(ECA_KERNELS.items()))
def test_eca_kernel_size_table(channels, kernel):
  t = int(abs((math.log2(channels) + 1) / 2))
  assert attention.eca_kernel_size(channels) == kernel == (t if t % 2 else t + 1)


def test_eca_kernel_size_rejects_zero():
  with pytest.raises(ValueError, match='channels >= 1'):
    attention.eca_kernel_size(0)


@pytest.mark.parametrize('channels', [16, 144])  # k = 3 and k = 5
def test_eca_matches_numpy_reference(channels):
  x = _x((2, 5, 6, channels))
  layer = attention.EfficientChannelAttention()
  variables = layer.init(jax.random.PRNGKey(1), x)
  w = np.asarray(variables['params']['conv']['kernel'])  # [k, 1, 1]
  k = attention.eca_kernel_size(channels)
  assert w.shape == (k, 1, 1)
  assert np.all(np.abs(w) <= 1 / math.sqrt(k))           # torch Conv1d default init range

  pooled = x.mean(axis=(1, 2))                            # [B, C]
  padded = np.pad(pooled, ((0, 0), ((k - 1) // 2,) * 2))  # zero padding (k-1)/2
  logits = np.stack([sum(w[j, 0, 0] * padded[:, c + j] for j in range(k))
                     for c in range(channels)], axis=-1)  # cross-correlation, no bias
  expected = x * _sigmoid(logits)[:, None, None, :]
  got = np.asarray(layer.apply(variables, x))
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_se_matches_torchvision():
  cin, channels = 24, 144                                 # block input 24 -> squeeze 6
  x = _x((2, 7, 5, channels))
  layer = attention.make('se', cin, dtype=jnp.float32, name=None)
  variables = layer.init(jax.random.PRNGKey(0), x)
  p = variables['params']
  assert p['fc1']['kernel'].shape == (1, 1, channels, 6)
  assert p['fc2']['kernel'].shape == (1, 1, 6, channels)

  torch.manual_seed(0)
  ref = torchvision.ops.SqueezeExcitation(channels, 6, activation=torch.nn.SiLU).eval()
  rng = np.random.RandomState(3)
  p = {n: {'kernel': rng.randn(*p[n]['kernel'].shape).astype(np.float32) * 0.3,
           'bias': rng.randn(*p[n]['bias'].shape).astype(np.float32) * 0.3}
       for n in ('fc1', 'fc2')}
  with torch.no_grad():
    for n in ('fc1', 'fc2'):
      getattr(ref, n).weight.copy_(torch.from_numpy(p[n]['kernel'].transpose(3, 2, 0, 1)))
      getattr(ref, n).bias.copy_(torch.from_numpy(p[n]['bias']))
    expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  got = np.asarray(layer.apply({'params': p}, x))
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_spatial_gate_matches_torch_conv():
  x = _x((2, 9, 11, 8))
  layer = attention.SpatialGate()
  variables = layer.init(jax.random.PRNGKey(0), x)
  kernel = np.array(variables['params']['conv']['kernel'])  # [7, 7, 2, 1]
  bias = np.float32(0.25)
  assert kernel.shape == (7, 7, 2, 1)

  maps = np.concatenate([x.mean(-1, keepdims=True), x.max(-1, keepdims=True)], -1)
  with torch.no_grad():
    s = torch.nn.functional.conv2d(torch.from_numpy(maps).permute(0, 3, 1, 2),
                                   torch.from_numpy(kernel.transpose(3, 2, 0, 1)),
                                   torch.tensor([bias]), padding=3)
  expected = x * _sigmoid(s.permute(0, 2, 3, 1).numpy())
  params = {'conv': {'kernel': kernel, 'bias': np.array([bias])}}
  got = np.asarray(layer.apply({'params': params}, x))
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_eca_spatial_is_eca_then_spatial_gate():
  x = _x((1, 6, 6, 40))
  layer = attention.make('eca_spatial', 40, dtype=jnp.float32, name=None)
  variables = layer.init(jax.random.PRNGKey(0), x)
  p = variables['params']
  assert jax.tree.map(np.shape, p) == {
      'eca': {'conv': {'kernel': (3, 1, 1)}},
      'spatial': {'conv': {'kernel': (7, 7, 2, 1), 'bias': (1,)}}}
  y = attention.EfficientChannelAttention().apply({'params': p['eca']}, x)
  expected = attention.SpatialGate().apply({'params': p['spatial']}, y)
  np.testing.assert_allclose(np.asarray(layer.apply(variables, x)), np.asarray(expected),
                             atol=1e-7)


def test_make_rejects_unknown_attention():
  with pytest.raises(ValueError, match=r"unknown attention 'cbam'.*'eca'"):
    attention.make('cbam', 16, dtype=jnp.float32, name=None)
