"""`models/layers/conv.py`: the CPU-friendly lowerings compute lax's convolution exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flowers_jax.models.layers import conv

DN = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('shape,kernel,strides,groups', [
    ((2, 2, 2, 8), (3, 3, 8, 4), (1, 1), 1),     # 2x2 map, 3x3 kernel: im2col
    ((2, 1, 1, 8), (3, 3, 8, 4), (1, 1), 1),     # 1x1 map
    ((2, 9, 7, 6), (5, 5, 1, 6), (2, 2), 6),     # depthwise 5x5/2: shifted taps
    ((2, 8, 8, 6), (3, 3, 1, 6), (1, 1), 6),     # depthwise 3x3/1
    ((2, 8, 8, 6), (3, 3, 6, 4), (1, 1), 1),     # a plain conv: lax itself
])
def test_lowerings_equal_lax_values_and_gradients(shape, kernel, strides, groups):
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=shape), rng.normal(size=kernel)
  pad = [((k - 1) // 2, (k - 1) // 2) for k in kernel[:2]]

  def f(fn, x, w):
    return jnp.sum(jnp.sin(fn(x, w, strides, pad, dimension_numbers=DN,
                              feature_group_count=groups)))

  with jax.enable_x64(True):
    ours = jax.value_and_grad(lambda x, w: f(conv.conv_general_dilated, x, w), (0, 1))(x, w)
    ref = jax.value_and_grad(lambda x, w: f(lax.conv_general_dilated, x, w), (0, 1))(x, w)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-12)
  for g, r in zip(ours[1], ref[1]):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('shape,features,groups,lowered', [
    ((1, 2, 2, 8), 4, 1, True), ((1, 8, 8, 8), 8, 8, True), ((1, 8, 8, 8), 4, 1, False)])
def test_flax_conv_takes_the_lowering(shape, features, groups, lowered, monkeypatch):
  """Through `nn.Conv` (which passes ConvDimensionNumbers, not strings) the lowering is used."""
  import flax.linen as nn
  calls = []
  real = lax.conv_general_dilated
  monkeypatch.setattr(conv.lax, 'conv_general_dilated',
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  layer = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=groups,
                  conv_general_dilated=conv.conv_general_dilated)
  layer.init(jax.random.key(0), jnp.zeros(shape))
  assert (not calls) == lowered
