"""`lax.conv_general_dilated` with two lowerings that XLA's CPU backend does badly.

Passed to `nn.Conv(conv_general_dilated=conv_general_dilated)` by ResNet and EfficientNet. The
numbers are the same convolution (checked against torchvision block by block in the parity
tests); only the lowering changes:

- A stride-1 conv on a map with fewer pixels than the kernel (ResNet's 3x3 convs on layer4's
  1x1 / 2x2 maps at 32-64 px): XLA's algebraic simplifier swaps such a conv's operands
  (H*W < kh*kw) into a form its fast CPU conv libraries do not take; measured 1.8 s vs 30 ms
  for pad + kh*kw shifted slices + one dot (3x3, 512 channels, batch 32, 2x2 map).
  Any backend: on GPUs at 224 px no map is that small, so nothing changes there.
- Depthwise convs (EfficientNet, kernel [k, k, 1, C]) on the CPU: XLA CPU's grouped conv is
  slow at every size (EfficientNet-B0's 12 depthwise shapes at 64 px: 1638 ms fwd+bwd vs 72 ms
  as k*k strided slices times a per-channel tap). GPUs and TPUs keep their native kernel.

Measured on this repo's 2-core CPU (training step, batch 8, 64 px, one core): ResNet18 3072 ->
384 ms, EfficientNet-B0 1317 -> 202 ms (docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc_hwio(dimension_numbers, lhs_shape, rhs_shape) -> bool:
  """Whether `dimension_numbers` (strings, as callers write them, or the ConvDimensionNumbers
  Flax passes) are NHWC / HWIO / NHWC."""
  if dimension_numbers is None or len(lhs_shape) != 4:
    return False
  want = lax.conv_dimension_numbers(lhs_shape, rhs_shape, NHWC_HWIO)
  return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == want


def _no_dilation(*dilations) -> bool:
  return all(d is None or all(int(v) == 1 for v in d) for d in dilations)


def _explicit(padding) -> bool:
  return not isinstance(padding, str)


def _im2col_conv(x, kernel, padding, precision):
  """Stride-1 conv as pad + kh*kw shifted slices concatenated on channels + one dot.

  x [B, H, W, C], kernel [kh, kw, C, O] -> [B, Ho, Wo, O]."""
  kh, kw, c, _ = kernel.shape
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
                         axis=-1)                                       # [B, Ho, Wo, kh*kw*C]
  return jnp.einsum('bhwk,ko->bhwo', cols, kernel.reshape(kh * kw * c, -1),
                    precision=precision)


def _depthwise_taps(x, kernel, strides, padding):
  """Depthwise conv as a sum of kh*kw strided slices times a per-channel tap.

  x [B, H, W, C], kernel [kh, kw, 1, C] -> [B, Ho, Wo, C]."""
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] * kernel[i, j, 0]
      out = tap if out is None else out + tap
  return out


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` (Flax's NHWC / HWIO call), lowered as the module docstring says
  where that is faster, unchanged everywhere else."""
  plain = (_is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape) and _explicit(padding)
           and _no_dilation(lhs_dilation, rhs_dilation) and not kwargs)
  if plain:
    kh, kw, kin, out = rhs.shape
    strides = tuple(int(s) for s in window_strides)
    groups = feature_group_count
    if (groups == 1 and strides == (1, 1) and lhs.shape[1] * lhs.shape[2] < kh * kw):
      return _im2col_conv(lhs, rhs, padding, precision)
    if (groups > 1 and kin == 1 and groups == lhs.shape[-1] == out
        and jax.default_backend() == 'cpu'):
      return _depthwise_taps(lhs, rhs, strides, padding)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  precision=precision, **kwargs)
