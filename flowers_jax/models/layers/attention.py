"""Channel / spatial attention gates for MBConv blocks: SE, ECA, ECA + spatial.

All gates take and return `[B, H, W, C]` (NHWC) and sit where torchvision's
`SqueezeExcitation` sits in an MBConv block: after the depthwise conv, on the
expanded channels. `ATTENTION` maps the EfficientNet `attention` option to a
constructor `(block_input_channels, dtype, name) -> nn.Module`.

- `'se'`: torchvision `ops.misc.SqueezeExcitation` (Hu et al. 2018): global
  average pool -> 1x1 conv `fc1` (C -> S, bias) -> SiLU -> 1x1 conv `fc2`
  (S -> C, bias) -> sigmoid -> scale, S = max(1, block_input_channels // 4).
  Parameter paths `fc1/kernel [1, 1, C, S]`, `fc2/kernel [1, 1, S, C]` mirror
  the torch keys `fc1.weight [S, C, 1, 1]`, `fc2.weight [C, S, 1, 1]`.
- `'eca'`: ECA-Net (Wang et al. 2020): global average pool -> 1-D conv across
  the channel axis (kernel k = `eca_kernel_size(C)`, zero padding (k-1)/2, no
  bias) -> sigmoid -> scale. One parameter, `conv/kernel [k, 1, 1]` (torch
  `nn.Conv1d(1, 1, k)` as in timm's `EcaModule`: `conv.weight [1, 1, k]`).
  Initialised like torch's default Conv1d init, U(-1/sqrt(k), 1/sqrt(k))
  (`torch_init.kaiming_uniform_a_sqrt5`).
- `'eca_spatial'`: ECA (`eca/...`) followed by a CBAM-style spatial gate
  (`spatial/...`, Woo et al. 2018): concat [channel-mean, channel-max] maps
  `[B, H, W, 2]` -> 7x7 conv (padding 3, bias) -> sigmoid -> scale. The spatial
  conv is initialised like every torchvision EfficientNet conv
  (`torch_init.kaiming_normal_fan_out`; bias 0), i.e. the gate starts random
  around sigmoid(0) = 0.5, not neutral; fine-tuning learns it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from flowers_jax.models.layers import torch_init

Dtype = Any


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA-Net's adaptive kernel size: the odd number nearest above t = |(log2 C + b) / gamma|.

  k = t if t is odd else t + 1, t = int(abs((log2(C) + b) / gamma)).
  E.g. C = 16..127 -> 3, 128..2047 -> 5 (with gamma=2, b=1).
  """
  if channels < 1:
    raise ValueError(f'eca_kernel_size needs channels >= 1, got {channels}')
  t = int(abs((math.log2(channels) + b) / gamma))
  return t if t % 2 else t + 1


class SqueezeExcitation(nn.Module):
  """torchvision `SqueezeExcitation` with SiLU: `[B, H, W, C] -> [B, H, W, C]`."""
  squeeze_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    conv = lambda features, name: nn.Conv(
        features, (1, 1), use_bias=True, dtype=self.dtype,
        kernel_init=torch_init.kaiming_normal_fan_out, name=name)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)              # [B, 1, 1, C]
    s = nn.silu(conv(self.squeeze_channels, 'fc1')(s))       # [B, 1, 1, S]
    s = nn.sigmoid(conv(channels, 'fc2')(s))                 # [B, 1, 1, C]
    return x * s


class EfficientChannelAttention(nn.Module):
  """ECA: `[B, H, W, C] -> [B, H, W, C]`; kernel_size None = `eca_kernel_size(C)`."""
  kernel_size: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size or eca_kernel_size(x.shape[-1])
    pad = (k - 1) // 2
    y = jnp.mean(x, axis=(1, 2))[..., None]                  # [B, C, 1]: length C, 1 feature
    y = nn.Conv(1, (k,), padding=((pad, pad),), use_bias=False, dtype=self.dtype,
                kernel_init=torch_init.kaiming_uniform_a_sqrt5, name='conv')(y)  # [B, C, 1]
    return x * nn.sigmoid(y[..., 0])[:, None, None, :]       # gate [B, 1, 1, C]


class SpatialGate(nn.Module):
  """CBAM spatial gate: `[B, H, W, C] -> [B, H, W, C]`, one gate value per pixel."""
  kernel_size: int = 7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = (self.kernel_size - 1) // 2
    maps = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True),
                            jnp.max(x, axis=-1, keepdims=True)], axis=-1)  # [B, H, W, 2]
    s = nn.Conv(1, (self.kernel_size,) * 2, padding=((pad, pad), (pad, pad)),
                use_bias=True, dtype=self.dtype,
                kernel_init=torch_init.kaiming_normal_fan_out, name='conv')(maps)  # [B, H, W, 1]
    return x * nn.sigmoid(s)


class EcaSpatial(nn.Module):
  """ECA then the CBAM spatial gate: `[B, H, W, C] -> [B, H, W, C]`."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = EfficientChannelAttention(dtype=self.dtype, name='eca')(x)
    return SpatialGate(dtype=self.dtype, name='spatial')(x)


# option -> (block_input_channels, dtype, name) -> gate module.
ATTENTION: dict[str, Callable[[int, Dtype, str], nn.Module]] = {
    'se': lambda cin, dtype, name: SqueezeExcitation(max(1, cin // 4), dtype=dtype, name=name),
    'eca': lambda cin, dtype, name: EfficientChannelAttention(dtype=dtype, name=name),
    'eca_spatial': lambda cin, dtype, name: EcaSpatial(dtype=dtype, name=name),
}


def make(attention: str, block_input_channels: int, *, dtype: Dtype, name: str) -> nn.Module:
  """The gate called `attention` (a key of `ATTENTION`) for one MBConv block."""
  if attention not in ATTENTION:
    raise ValueError(f'unknown attention {attention!r}; valid: {sorted(ATTENTION)}')
  return ATTENTION[attention](block_input_channels, dtype, name)
