"""Deformable convolution with `torchvision.ops.deform_conv2d` semantics, in NHWC.

A deformable convolution samples its input at the regular conv grid shifted by a
learned offset per output pixel and kernel tap (Dai et al. 2017), optionally scaled by
a learned mask per tap (DCNv2, Zhu et al. 2019). The sample point of output pixel
(oy, ox), tap (i, j), offset group g is

    y = oy * stride_h - pad_h + i * dilation_h + dy[g, i, j]      (same for x)

and its value is the bilinear interpolation of the four integer neighbours
floor(y), floor(y) + 1 (x alike) with fractional weights; a neighbour outside the image
contributes 0. That reproduces torchvision's CPU/CUDA kernel (`bilinear_interpolate`
returns 0 when y <= -1 or y >= H, which is exactly where all four neighbours are
outside) and its gradients: torchvision's offset gradient (`get_coordinate_weight`) is
the derivative of this floor + fraction form, one-sided at integer positions. Writing
the weights as the "tent" max(0, 1 - |y - k|) instead would give a zero offset
gradient at integer positions, hence at init (zero offsets).

Layouts (torch NCHW -> here NHWC, channels last):
  x       [B, H, W, C_in]                  torch (B, C_in, H, W)
  offset  [B, Ho, Wo, 2 * G * kh * kw]     channel g*2K + 2*(i*kw + j) + {0: dy, 1: dx}
  mask    [B, Ho, Wo, G * kh * kw]         channel g*K + i*kw + j
  kernel  [kh, kw, C_in // groups, C_out]  torch weight (C_out, C_in // groups, kh, kw)
with K = kh * kw, G offset groups (input channels split in G contiguous blocks, each
with its own offsets) and `groups` weight groups, both inferred from the shapes as
torchvision does.

Implementation: a gather per bilinear neighbour (rows of C_in // G channels) summed
with the neighbour's weights into a deformable im2col of B*Ho*Wo*K*C_in values, then one
einsum with the kernel. No loops over pixels; peak memory a few times the columns.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowers_jax.models.layers import torch_init

IntOrPair = int | Sequence[int]

def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
    raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')
  return pair


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
  """Output length of a conv along one axis (torch's formula)."""
  return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


class _Geometry(NamedTuple):
  kernel_size: tuple[int, int]
  stride: tuple[int, int]
  padding: tuple[int, int]
  dilation: tuple[int, int]
  out_size: tuple[int, int]
  offset_groups: int
  weight_groups: int


def _check_shapes(x, offset, kernel, bias, mask, stride, padding, dilation) -> _Geometry:
  """Validates the operands like torchvision and infers the groups and output size."""
  for name, a in (('x', x), ('offset', offset), ('kernel', kernel)) + (
      (('mask', mask),) if mask is not None else ()):
    if a.ndim != 4:
      raise ValueError(f'{name} must have 4 dims, got shape {a.shape}')
  stride, padding, dilation = (_pair(stride, 'stride'), _pair(padding, 'padding'),
                               _pair(dilation, 'dilation'))
  if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
    raise ValueError(f'need stride >= 1, dilation >= 1, padding >= 0; got stride='
                     f'{stride}, dilation={dilation}, padding={padding}')
  b, h, w, c_in = x.shape
  kh, kw, c_in_per_group, c_out = kernel.shape
  if c_in_per_group < 1 or c_in % c_in_per_group:
    raise ValueError(f'kernel [kh, kw, C_in // groups, C_out] = {kernel.shape}: its dim '
                     f'2 must divide C_in = {c_in} (x.shape = {x.shape})')
  weight_groups = c_in // c_in_per_group
  if c_out % weight_groups:
    raise ValueError(f'C_out = {c_out} must be divisible by groups = {weight_groups} '
                     f'(= C_in {c_in} // kernel.shape[2] {c_in_per_group})')
  taps = kh * kw
  if offset.shape[-1] == 0 or offset.shape[-1] % (2 * taps):
    raise ValueError(f'offset channels must be a positive multiple of 2 * kh * kw = '
                     f'{2 * taps}, got offset.shape = {offset.shape}')
  offset_groups = offset.shape[-1] // (2 * taps)
  if c_in % offset_groups:
    raise ValueError(f'C_in = {c_in} must be divisible by offset groups = '
                     f'{offset_groups} (= offset channels {offset.shape[-1]} // '
                     f'(2 * {kh} * {kw}))')
  out_size = tuple(output_size(*a) for a in zip((h, w), (kh, kw), stride, padding, dilation))
  if min(out_size) < 1:
    raise ValueError(f'output size {out_size} is empty for input {(h, w)}, kernel '
                     f'{(kh, kw)}, stride {stride}, padding {padding}, dilation {dilation}')
  expected = (b, *out_size, 2 * offset_groups * taps)
  if offset.shape != expected:
    raise ValueError(f'offset must have shape [B, Ho, Wo, 2*G*kh*kw] = {expected}, '
                     f'got {offset.shape}')
  if mask is not None and mask.shape != (b, *out_size, offset_groups * taps):
    raise ValueError(f'mask must have shape [B, Ho, Wo, G*kh*kw] = '
                     f'{(b, *out_size, offset_groups * taps)}, got {mask.shape}')
  if bias is not None and bias.shape != (c_out,):
    raise ValueError(f'bias must have shape [C_out] = {(c_out,)}, got {bias.shape}')
  return _Geometry((kh, kw), stride, padding, dilation, out_size, offset_groups,
                   weight_groups)


def _bilinear_neighbours(y, x, height: int, width: int):
  """The 4 integer neighbours of points (y, x) and their bilinear weights.

  Args:
    y, x: [...] float sample coordinates (row, column) in pixels.
  Returns:
    index [..., 4] int32 flat pixel index y * width + x (clipped into the image) and
    weight [..., 4] (0 for a neighbour outside the image), in the order
    (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1) with y0 = floor(y).
  """
  # Beyond [-1, size] every neighbour is outside; clipping there only keeps the int
  # cast finite and does not change values or gradients (both are 0 out there).
  y = jnp.clip(y, -2, height + 1)
  x = jnp.clip(x, -2, width + 1)
  y0, x0 = jnp.floor(y), jnp.floor(x)  # floor has zero gradient, so d/dy = d/d(y - y0).
  ly, lx = y - y0, x - x0
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
  wy = jnp.stack([1 - ly, 1 - ly, ly, ly], axis=-1)
  wx = jnp.stack([1 - lx, lx, 1 - lx, lx], axis=-1)
  inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
  index = jnp.clip(ys, 0, height - 1) * width + jnp.clip(xs, 0, width - 1)
  return index, jnp.where(inside, wy * wx, 0)


def deformable_columns(x, offset, mask, geometry: _Geometry):
  """Deformable im2col: the (masked) bilinear samples of every output pixel and tap.

  Args:
    x: [B, H, W, C_in].
    offset: [B, Ho, Wo, 2 * G * kh * kw] (torchvision channel order).
    mask: [B, Ho, Wo, G * kh * kw] or None.
    geometry: from `_check_shapes`.
  Returns:
    [B, Ho, Wo, kh * kw, C_in] in x's dtype.
  """
  b, h, w, c_in = x.shape
  (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry[:4]
  ho, wo = geometry.out_size
  g, taps = geometry.offset_groups, kh * kw
  coord_dtype = jnp.promote_types(offset.dtype, jnp.float32)
  # [B, Ho, Wo, K, G, 2]: taps first so that the samples come out channel-ordered.
  offset = offset.reshape(b, ho, wo, g, taps, 2).swapaxes(3, 4).astype(coord_dtype)
  rows = (jnp.arange(ho) * sh - ph)[:, None] + jnp.arange(kh) * dh  # [Ho, kh]
  cols = (jnp.arange(wo) * sw - pw)[:, None] + jnp.arange(kw) * dw  # [Wo, kw]
  base_y = jnp.broadcast_to(rows[:, None, :, None], (ho, wo, kh, kw)).reshape(ho, wo, taps)
  base_x = jnp.broadcast_to(cols[None, :, None, :], (ho, wo, kh, kw)).reshape(ho, wo, taps)
  y = base_y[..., None].astype(coord_dtype) + offset[..., 0]  # [B, Ho, Wo, K, G]
  x_ = base_x[..., None].astype(coord_dtype) + offset[..., 1]
  index, weight = _bilinear_neighbours(y, x_, h, w)  # [B, Ho, Wo, K, G, 4]
  if mask is not None:
    mask = mask.reshape(b, ho, wo, g, taps).swapaxes(3, 4)
    weight = weight * mask[..., None].astype(coord_dtype)
  # One row per (image, pixel, offset group): [B*H*W*G, C_in // G].
  table = x.reshape(b * h * w * g, c_in // g)
  row = (jnp.arange(b)[:, None, None, None, None, None] * (h * w) + index) * g + (
      jnp.arange(g)[:, None])

  # The 4 neighbours one at a time (a scan, rematerialised in the backward pass), not
  # one gather of all 4: that materialises 4x the columns in the forward and backward
  # passes. The product is an einsum rather than `*` because its transpose (the weight
  # gradient) is then a dot, which XLA:CPU runs ~5x faster than reduce(multiply).
  # On CPU (B=4, 64 channels, 56x56) this took fwd+bwd from 1.6 s to 0.4 s and the
  # XLA temp memory from 480 to 120 MiB (columns: 28 MiB).
  @jax.checkpoint
  def add_neighbour(columns, row_and_weight):
    row, weight = row_and_weight  # [B, Ho, Wo, K, G]
    neighbour = table.at[row].get(mode='promise_in_bounds')  # [B, Ho, Wo, K, G, C_in // G]
    # HIGHEST: an elementwise product, which must not round the samples to TF32 on GPU.
    weighted = jnp.einsum('...c,...->...c', neighbour, weight,
                          precision=jax.lax.Precision.HIGHEST)
    return columns + weighted, None

  neighbours = (jnp.moveaxis(row, -1, 0), jnp.moveaxis(weight.astype(x.dtype), -1, 0))
  columns = jnp.zeros((b, ho, wo, taps, g, c_in // g), x.dtype)
  columns, _ = jax.lax.scan(add_neighbour, columns, neighbours)
  return columns.reshape(b, ho, wo, taps, c_in)


def deform_conv2d(x, offset, kernel, bias=None, mask=None, *, stride: IntOrPair = 1,
                  padding: IntOrPair = 0, dilation: IntOrPair = 1, precision=None):
  """`torchvision.ops.deform_conv2d` in NHWC (see the module docstring for layouts).

  Args:
    x: [B, H, W, C_in].
    offset: [B, Ho, Wo, 2 * G * kh * kw], (dy, dx) per offset group and tap.
    kernel: [kh, kw, C_in // groups, C_out].
    bias: [C_out] or None.
    mask: [B, Ho, Wo, G * kh * kw] (DCNv2 modulation) or None (= all ones).
    stride, padding, dilation: int or (h, w) pair; padding is symmetric, zeros.
    precision: `jax.lax.Precision` of the kernel contraction.
  Returns:
    [B, Ho, Wo, C_out], Ho = (H + 2 * pad - dilation * (kh - 1) - 1) // stride + 1.
  """
  x, offset, kernel = jnp.asarray(x), jnp.asarray(offset), jnp.asarray(kernel)
  bias = None if bias is None else jnp.asarray(bias)
  mask = None if mask is None else jnp.asarray(mask)
  geometry = _check_shapes(x, offset, kernel, bias, mask, stride, padding, dilation)
  # Rematerialised in the backward pass: between forward and backward only x, offset,
  # mask and the columns (for the kernel gradient) are kept, not the neighbour indices
  # and weights (B=4, 64 channels, 56x56: 32 instead of 42 MiB).
  columns = jax.checkpoint(deformable_columns, static_argnums=(3,))(
      x, offset, mask, geometry)  # [B, Ho, Wo, K, C_in]
  _, _, c_in_per_group, c_out = kernel.shape
  groups = geometry.weight_groups
  b, ho, wo, taps, _ = columns.shape
  if groups == 1:  # A plain matmul; a size-1 batch dim g made it ~3x slower on CPU.
    kernel = kernel.reshape(taps, c_in_per_group, c_out)
    out = jnp.einsum('bhwkc,kco->bhwo', columns, kernel, precision=precision)
  else:
    columns = columns.reshape(b, ho, wo, taps, groups, c_in_per_group)
    kernel = kernel.reshape(taps, c_in_per_group, groups, c_out // groups)
    out = jnp.einsum('bhwkgc,kcgo->bhwgo', columns, kernel, precision=precision)
    out = out.reshape(b, ho, wo, c_out)
  return out if bias is None else out + bias


class DeformConv(nn.Module):
  """A deformable conv whose offsets (and mask) a zero-initialised conv predicts.

  At init the offsets are 0 (and the mask 1), so the layer equals the plain conv with
  the same `kernel` and `bias`. The offset predictor `offset` is an `nn.Conv` with the
  same kernel size, stride, padding and dilation as the deformable conv (as in Dai et
  al. 2017 and mmcv's DeformConv2dPack), so its output is [B, Ho, Wo, ...] for any
  geometry; it outputs 2*G*K offsets in torchvision's order, then (with `use_mask`) G*K
  mask logits m. The mask is 2 * sigmoid(m), in (0, 2), equal to 1 at init. (DCNv2 and
  mmcv use sigmoid(m), which would halve the layer's output at init.)

  Params: `kernel` [kh, kw, C_in // feature_group_count, features], `bias` [features],
  `offset/kernel`, `offset/bias`.
  """
  features: int
  kernel_size: IntOrPair
  strides: IntOrPair = 1
  padding: IntOrPair = 0
  dilation: IntOrPair = 1
  offset_groups: int = 1
  feature_group_count: int = 1
  use_mask: bool = False
  use_bias: bool = True
  kernel_init: Callable[..., Any] = torch_init.kaiming_uniform_a_sqrt5
  bias_init: Callable[..., Any] = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    """x [B, H, W, C_in] -> [B, Ho, Wo, features]."""
    kh, kw = _pair(self.kernel_size, 'kernel_size')
    ph, pw = _pair(self.padding, 'padding')
    taps, groups = kh * kw, self.offset_groups
    if x.shape[-1] % self.feature_group_count:
      raise ValueError(f'input channels {x.shape[-1]} must be divisible by '
                       f'feature_group_count = {self.feature_group_count}')
    predicted = nn.Conv(
        groups * taps * (3 if self.use_mask else 2), (kh, kw),
        strides=_pair(self.strides, 'strides'), padding=((ph, ph), (pw, pw)),
        kernel_dilation=_pair(self.dilation, 'dilation'),
        kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        name='offset')(x)
    offset = predicted[..., :2 * groups * taps]
    mask = 2 * jax.nn.sigmoid(predicted[..., 2 * groups * taps:]) if self.use_mask else None
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, x.shape[-1] // self.feature_group_count, self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return deform_conv2d(x, offset, kernel, bias, mask, stride=self.strides,
                         padding=self.padding, dilation=self.dilation,
                         precision=self.precision)
