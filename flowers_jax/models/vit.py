"""ViT-B/16, B/32 and L/16, torchvision-exact, in Flax Linen (NHWC input).

Matches `torchvision.models.vit_b_16` / `vit_b_32` / `vit_l_16` (torchvision 0.29
`models/vision_transformer.py`); `SIZES` holds their patch size P, width D, depth L,
heads H and MLP width. Shapes below for B/16 (P 16, D 768, L 12, H 12, MLP 3072) at 224 px:

- `conv_proj`: PxP/P conv 3 -> D (with bias); the [B, 14, 14, 768] grid is
  flattened row-major into 196 tokens, exactly torch's `reshape(n, 768, 196).permute`.
- `class_token` [1, 1, D] is concatenated *first*, then `encoder.pos_embedding`
  [1, 197, 768] is added, then dropout.
- `encoder.layers.encoder_layer_{i}` (L of them), pre-norm:
  x = x + dropout(self_attention(ln_1(x))); x = x + mlp(ln_2(x)),
  mlp = Linear 768 -> 3072 ('0'), exact (erf) GELU, dropout, Linear 3072 -> 768 ('3'),
  dropout. LayerNorm eps 1e-6 everywhere, `encoder.ln` at the end; the class token's
  output is pre_logits [B, D]; `heads.head` is the classifier.
- `self_attention` is Flax `MultiHeadDotProductAttention` (H heads of D / H): its
  `query`/`key`/`value` kernels [768, 12, 64] and `out` kernel [12, 64, 768] come from
  torch's stacked `in_proj_weight` [2304, 768] / `out_proj.weight` [768, 768] through
  the special conversion rows `TORCH_RULES` below, which take every size from the arrays
  and the model's shapes (older state_dicts name the MLP `mlp.linear_1` / `mlp.linear_2`:
  `TORCH_ALIASES`).
- Initialisers follow torchvision where it sets them: pos_embedding N(0, 0.02),
  class_token 0, MLP xavier-uniform with N(0, 1e-6) biases, `heads.head` zeros,
  conv_proj N(0, 1/fan_in) truncated at +-2 (absolute, as torch's trunc_normal_), q/k/v
  xavier-uniform over torch's stacked [3D, D] in_proj, out_proj nn.Linear's default
  U(+-1/sqrt(D)) (`layers/torch_init.py`), attention biases 0.

`model.apply(variables, x)` returns `(logits [B, num_classes], {'pre_logits': [B, D]})`.
Parameters with 1000 classes: B/16 86,567,656; B/32 88,224,232; L/16 304,326,632.

Image size: the model is built for one `image_size` (a multiple of P; default 224)
and raises a ValueError for any other input size. A checkpoint trained at another size
(e.g. torchvision's 224 weights into `image_size=384`) is loaded by resizing its
position embedding: `resize_pos_embedding` keeps the class-token row and bicubically
resamples the 14x14 grid of patch rows to the target grid (24x24), as torchvision's
`interpolate_embeddings` does (PyTorch's bicubic kernel, a = -0.75, border clamp,
`align_corners=True` like torchvision; `align_corners=False` on request). The
converter's `encoder.pos_embedding` row calls it with the model's target shape.

Intermediate token sequences for parity tests: `apply(..., capture_intermediates=True,
mutable=['intermediates'])` records `intermediates/encoder/layers/encoder_layer_{i}/
__call__` ([B, 197, 768]).

Option `remat` (default False): activation checkpointing per encoder block
(`RematEncoderBlock`): the backward pass recomputes each block's forward from its input
instead of keeping its activations. Same parameter paths, same numbers (dropout
masks included), less memory, about one more forward pass of compute per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flowers_jax.models import registry
from flowers_jax.models.layers import torch_init
from flowers_jax.models.layers.dropout import Dropout
from flowers_jax.precision import promote

HEAD = r'^heads/'
LN_EPS = 1e-6
# Exempt from weight decay besides biases and norm scales (torchvision's ViT recipe:
# references/classification/train.py --transformer-embedding-decay 0).
NO_WEIGHT_DECAY = r'(^|/)(pos_embedding|class_token)$'


def layer_norm_(dtype: Any, name: str) -> nn.LayerNorm:
  """torch `LayerNorm(eps=1e-6)`: two-pass variance (Flax's fast E[x^2] - E[x]^2 is off by
  6.7e-3 from torch when a token's mean is 100x its std; two-pass: 2.3e-5)."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


class MLPBlock(nn.Module):
  """torchvision `MLPBlock`: Linear '0' -> GELU -> Dropout -> Linear '3' -> Dropout."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap batch axis: dropout masks drawn for the global batch

  @nn.compact
  def __call__(self, x, train: bool = False):  # [B, N, D] -> [B, N, D]
    d = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(1e-6), name=name)
    x = nn.gelu(dense(self.mlp_dim, '0')(x), approximate=False)
    x = Dropout(self.dropout, self.axis_name)(x, deterministic=not train)
    x = dense(d, '3')(x)
    return Dropout(self.dropout, self.axis_name)(x, deterministic=not train)


class _BlockFields(nn.Module):
  """The hyper-parameters of an encoder block, shared by the modules that build blocks."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap batch axis: dropout masks drawn for the global batch

  def fields_of(self, cls) -> dict:
    """This module's values of `cls`'s fields, to build a `cls` with them."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(cls)
            if f.name not in ('parent', 'name')}


class EncoderBlock(_BlockFields):
  """torchvision `EncoderBlock` (pre-norm): [B, N, D] -> [B, N, D]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    layer_norm = lambda name: layer_norm_(self.dtype, name)
    y = layer_norm('ln_1')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.attention_dropout,
        # torch MHA: q/k/v xavier-uniform over the stacked [3D, D] in_proj, i.e. half the
        # variance of a [D, D] xavier; out_proj nn.Linear's U(+-1/sqrt(D)); biases 0.
        kernel_init=nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform'),
        out_kernel_init=torch_init.kaiming_uniform_a_sqrt5,
        name='self_attention')(
            y, y, deterministic=not train)
    x = x + Dropout(self.dropout, self.axis_name)(y, deterministic=not train)
    y = layer_norm('ln_2')(x)
    return x + MLPBlock(self.mlp_dim, self.dropout, self.dtype, self.axis_name,
                        name='mlp')(y, train)


# Activation checkpointing of one encoder block (option `remat`): `jax.checkpoint` with policy
# None (nothing inside the block is saved for the backward pass, only its input [B, N, D]; its
# forward, dropout masks included, runs again in the backward pass) and prevent_cse=True (else
# XLA's CSE can merge the recomputation with the forward under jit). `train` is static:
# static_argnums counts `self` (flax's nn.checkpoint subtracts 1), so `train` of
# `__call__(self, x, train)` is 2, and must be passed positionally. The lifted module keeps
# the name given at the call ('encoder_layer_{i}'), so parameter paths do not change.
RematEncoderBlock = nn.remat(EncoderBlock, static_argnums=(2,), policy=None, prevent_cse=True)


class _EncoderFields(_BlockFields):
  """`_BlockFields`, the number of blocks and whether each block is rematerialised."""
  num_layers: int = 12
  remat: bool = False  # activation checkpointing per encoder block (`RematEncoderBlock`)


class EncoderLayers(_EncoderFields):
  """torch `encoder.layers`: blocks named 'encoder_layer_0', 'encoder_layer_1', ..."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = RematEncoderBlock if self.remat else EncoderBlock
    for i in range(self.num_layers):
      x = block(**self.fields_of(_BlockFields), name=f'encoder_layer_{i}')(x, train)
    return x


class Encoder(_EncoderFields):
  """torchvision `Encoder`: + pos_embedding, dropout, layers, ln. [B, N, D] -> [B, N, D]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + jnp.asarray(pos, self.dtype)
    x = Dropout(self.dropout, self.axis_name)(x, deterministic=not train)
    x = EncoderLayers(**self.fields_of(_EncoderFields), name='layers')(x, train)
    return layer_norm_(self.dtype, 'ln')(x)


class Heads(nn.Module):
  """torch `heads = Sequential(head=Linear)`, zero-initialised like torchvision."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, D] -> [B, num_classes]
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='head')(x)


class VisionTransformer(nn.Module):
  """torchvision VisionTransformer (no representation layer, no conv stem)."""
  num_classes: int
  image_size: int
  patch_size: int
  hidden_dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  bn_axis_name: str | None = None  # pmap batch axis (dropout masks for the global batch)
  dtype: Any = jnp.float32
  remat: bool = False  # activation checkpointing per encoder block

  def _check_input(self, x):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size={self.image_size} must be a multiple of the patch '
                       f'size {self.patch_size}')
    if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
          f'this ViT was built for [B, {self.image_size}, {self.image_size}, 3] images '
          f'(image_size={self.image_size}) but got shape {tuple(x.shape)}; resize the '
          f'images or build the model with image_size=<H> (a multiple of '
          f'{self.patch_size}; the position embedding of a {self.image_size} checkpoint '
          'is resized on conversion)')

  @nn.compact
  def __call__(self, x, train: bool = False, *, bn_train: bool | None = None):
    """Classifies [B, S, S, 3] images, S = `image_size`.

    `train` switches dropout (rng 'dropout'); `bn_train` is accepted and ignored.

    Returns:
      (logits [B, num_classes], {'pre_logits': [B, hidden_dim]}), float32 (float64 for
      float64 runs, `precision.py`);
      pre_logits is the class token's output of `encoder.ln`.
    """
    del bn_train  # no BatchNorm
    self._check_input(x)
    std = math.sqrt(1 / (3 * self.patch_size ** 2))  # torch trunc_normal_ cuts at +-2 absolute
    x = nn.Conv(self.hidden_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', dtype=self.dtype,
                kernel_init=nn.initializers.truncated_normal(std, lower=-2 / std, upper=2 / std),
                name='conv_proj')(jnp.asarray(x, self.dtype))  # [B, S/P, S/P, D]
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)                                  # [B, N, D], row-major
    cls = self.param('class_token', nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, x.dtype), (b, 1, d)), x], axis=1)
    x = Encoder(num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                dropout=self.dropout, attention_dropout=self.attention_dropout,
                dtype=self.dtype, axis_name=self.bn_axis_name, remat=self.remat,
                name='encoder')(x, train)
    pre_logits = x[:, 0]                                         # class token, [B, D]
    logits = Heads(self.num_classes, self.dtype, name='heads')(pre_logits)
    return promote(logits), {'pre_logits': promote(pre_logits)}


# ---------------------------------------------------------------------------------------
# Position-embedding resizing (PyTorch bicubic, as torchvision's interpolate_embeddings).


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's 4 cubic-convolution weights for fractional offsets t [N] -> [N, 4]."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """[n_out, n_in] matrix M with M @ v = torch 1-D bicubic resize of v (border clamp)."""
  dst = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
  else:
    src = (dst + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)                               # [n_out, 4]
  cols = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0, n_in - 1)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.repeat(np.arange(n_out), 4), cols.ravel()), weights.ravel())
  return m


def resize_pos_embedding(pos: np.ndarray, target_shape, *, align_corners: bool = True):
  """Resizes a ViT position embedding [1, 1 + g*g, D] to `target_shape` [1, 1 + G*G, D].

  The class-token row is kept; the g x g grid of patch rows is resized bicubically to
  G x G (PyTorch `F.interpolate(mode='bicubic')` semantics; torchvision's
  `interpolate_embeddings` uses align_corners=True). Returns float32.
  """
  pos = np.asarray(pos)
  target_shape = tuple(target_shape)
  if pos.shape == target_shape:
    return pos
  (_, n_in, d), (_, n_out, d_out) = pos.shape, target_shape
  g_in, g_out = math.isqrt(n_in - 1), math.isqrt(n_out - 1)
  if pos.shape[0] != 1 or d != d_out or g_in ** 2 != n_in - 1 or g_out ** 2 != n_out - 1:
    raise ValueError(f'cannot resize a position embedding of shape {pos.shape} to '
                     f'{target_shape}: both must be [1, 1 + g*g, D] with the same D')
  m = bicubic_matrix(g_in, g_out, align_corners)
  grid = pos[0, 1:].reshape(g_in, g_in, d).astype(np.float64)
  grid = np.einsum('ai,bj,ijd->abd', m, m, grid).reshape(1, g_out * g_out, d)
  return np.concatenate([pos[:, :1], grid], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Special rows of the torchvision <-> Flax table (convert.py applies the generic rules
# to everything else: conv_proj, ln_*, mlp.*, encoder.ln, heads.head).

# Sizes come from the arrays: torch's [3D, D] / [D, D] / [3D] and the model's Flax shapes
# (`target_shapes`: [D, H, D/H] q/k/v kernels, [H, D/H] biases, [H, D/H, D] out kernel).


def _split_qkv_kernel(w, *, target_shapes):  # torch in_proj_weight [3D, D] -> 3 x [D, H, D/H]
  return tuple(m.T.reshape(shape) for m, shape in zip(np.split(w, 3), target_shapes))


def _merge_qkv_kernel(q, k, v):  # 3 x [D, H, D/H] -> [3D, D]
  return np.concatenate([m.reshape(m.shape[0], -1).T for m in (q, k, v)])


def _split_qkv_bias(b, *, target_shapes):  # in_proj_bias [3D] -> 3 x [H, D/H]
  return tuple(m.reshape(shape) for m, shape in zip(np.split(b, 3), target_shapes))


def _merge_qkv_bias(q, k, v):  # 3 x [H, D/H] -> [3D]
  return np.concatenate([m.reshape(-1) for m in (q, k, v)])


def _out_kernel_to_flax(w, *, target_shapes):  # out_proj.weight [D, D] (out, in) -> [H, D/H, D]
  return w.T.reshape(target_shapes[0])


def _out_kernel_to_torch(k):  # [H, D/H, D] -> [D, D] (out, in)
  return k.reshape(-1, k.shape[-1]).T


def _pos_embedding_to_flax(pos, *, target_shapes=None):
  """encoder.pos_embedding [1, 1+g*g, D] -> the model's [1, 1+G*G, D] (bicubic if G != g)."""
  return pos if target_shapes is None else resize_pos_embedding(pos, target_shapes[0])


_ATTN = 'params/encoder/layers/{layer}/self_attention'
_TORCH_ATTN = 'encoder.layers.{layer}.self_attention'
TORCH_RULES = (
    registry.TorchRule('class_token', 'params/class_token'),
    registry.TorchRule('encoder.pos_embedding', 'params/encoder/pos_embedding',
                       to_flax=_pos_embedding_to_flax),
    registry.TorchRule(f'{_TORCH_ATTN}.in_proj_weight',
                       tuple(f'{_ATTN}/{n}/kernel' for n in ('query', 'key', 'value')),
                       to_flax=_split_qkv_kernel, to_torch=_merge_qkv_kernel),
    registry.TorchRule(f'{_TORCH_ATTN}.in_proj_bias',
                       tuple(f'{_ATTN}/{n}/bias' for n in ('query', 'key', 'value')),
                       to_flax=_split_qkv_bias, to_torch=_merge_qkv_bias),
    registry.TorchRule(f'{_TORCH_ATTN}.out_proj.weight', f'{_ATTN}/out/kernel',
                       to_flax=_out_kernel_to_flax, to_torch=_out_kernel_to_torch),
    registry.TorchRule(f'{_TORCH_ATTN}.out_proj.bias', f'{_ATTN}/out/bias'),
)
# torchvision < 0.13 named the MLP linears linear_1 / linear_2 (MLPBlock version 1).
TORCH_ALIASES = ((r'\.mlp\.linear_1\.', '.mlp.0.'), (r'\.mlp\.linear_2\.', '.mlp.3.'))


# ---------------------------------------------------------------------------------------
# The registered models: torchvision's `vit_*` builders.


@dataclasses.dataclass(frozen=True)
class Size:
  """A ViT's shape: patch size P, width D, depth L, heads H, MLP width."""
  patch_size: int
  hidden_dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int


SIZES = {  # torchvision name -> its `_vision_transformer(...)` arguments
    'vit_b_16': Size(patch_size=16, hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072),
    'vit_b_32': Size(patch_size=32, hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072),
    'vit_l_16': Size(patch_size=16, hidden_dim=1024, num_layers=24, num_heads=16, mlp_dim=4096),
}


def register(name: str, torchvision: str):
  """Registers torchvision's ViT `torchvision` (a key of `SIZES`) as `name`; returns its factory.

  The factory takes `image_size` (a multiple of the patch size), `dropout` and `remat`
  (activation checkpointing per encoder block) as options and builds a `VisionTransformer`
  whose pre_logits are [B, D].
  """
  size = SIZES[torchvision]

  def factory(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32,
              image_size=224, dropout=0.0, remat=False):
    return VisionTransformer(num_classes, image_size, **dataclasses.asdict(size),
                             dropout=dropout, bn_axis_name=bn_axis_name, dtype=dtype,
                             remat=remat)

  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = (f'torchvision {torchvision} ({size}) for [B, image_size, image_size, 3] '
                     f'inputs; pre_logits [B, {size.hidden_dim}].')
  return registry.register(name, head=HEAD, torchvision=torchvision, torch_rules=TORCH_RULES,
                           torch_aliases=TORCH_ALIASES, no_weight_decay=NO_WEIGHT_DECAY)(factory)


vit_b16 = register('vit_b16', torchvision='vit_b_16')
vit_b32 = register('vit_b32', torchvision='vit_b_32')
vit_l16 = register('vit_l16', torchvision='vit_l_16')
