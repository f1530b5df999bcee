"""EfficientNet-B0, torchvision-exact, in Flax Linen (NHWC), with SE / ECA / ECA+spatial gates.

Matches `torchvision.models.efficientnet_b0` (checked against torchvision 0.29's
`models/efficientnet.py` and `ops/misc.py`):

- `features.0`: stem conv 3x3/2 (3 -> 32, no bias) -> BatchNorm -> SiLU.
- `features.1..7`: MBConv stages (`STAGES`: expand ratio, kernel, stride, in -> out,
  repeats); only a stage's first block strides / changes width. A block is
  `block.{i}`: [expand 1x1 conv-BN-SiLU if ratio != 1] -> depthwise kxk conv-BN-SiLU
  -> attention gate (SE in torchvision) -> project 1x1 conv-BN (no activation); the
  residual (stride 1, in == out) goes through stochastic depth ('row' mode: one
  Bernoulli per example, survivors scaled by 1/(1-p)), p = 0.2 * block_index / 16.
- `features.8`: 1x1 conv 320 -> 1280 -> BN -> SiLU; global average pool; `classifier`
  = Dropout(0.2) (`classifier.0`) -> Linear 1280 -> num_classes (`classifier.1`).
- BatchNorm: torch default `nn.BatchNorm2d` for B0 (eps 1e-5, momentum 0.1 -> Flax
  momentum 0.9); B5-B7 / V2 use eps 1e-3 but are not built here. Padding is explicit and
  symmetric ((k - 1) // 2), never 'SAME'.
- Initialisers follow torchvision (`layers/torch_init.py`): kaiming-normal fan-out convs
  (bias 0), BN scale 1 / bias 0, classifier U(-1/sqrt(num_classes), 1/sqrt(num_classes))
  with bias 0.

`attention` ('se' | 'eca' | 'eca_spatial', `layers/attention.py`) chooses the gate in
the slot where torchvision's `SqueezeExcitation` sits, so every other parameter keeps
its torchvision name: a torchvision state_dict loads into an ECA model except the SE
`fc1`/`fc2` keys, and the ECA parameters start from their initialiser.

Flax paths mirror torch keys: ('features', '2', '0', 'block', '1', '0', 'kernel') is
'features.2.0.block.1.0.weight' (stage 2, block 0, depthwise conv). 5,288,548
parameters with 1000 classes.

`model.apply(variables, x)` returns `(logits [B, num_classes], {'pre_logits': [B, 1280]})`,
pre_logits the pooled features the classifier's dropout and Linear act on.

Intermediate feature maps for parity tests: `apply(..., capture_intermediates=True,
mutable=['intermediates'])` records `intermediates/features/{i}/__call__` for the stem
(i = 0), every stage (1..7) and the head conv (8).

Option `remat` (default False): activation checkpointing per stage (`features.1` ..
`features.7`, `RematStage`): the backward pass recomputes each stage's forward from its input.
Same parameter paths, same numbers (BatchNorm statistics and stochastic-depth masks included).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flowers_jax.models import registry
from flowers_jax.models.layers import attention as attention_lib
from flowers_jax.models.layers import torch_init
from flowers_jax.models.layers.conv import conv_general_dilated
from flowers_jax.models.layers.dropout import Dropout, stochastic_depth
from flowers_jax.models.layers.norm import torch_batchnorm
from flowers_jax.precision import promote

HEAD = r'^classifier/'
ATTENTION_OPTIONS = tuple(attention_lib.ATTENTION)

# (expand_ratio, kernel, stride, in_channels, out_channels, num_blocks): torchvision's
# `_efficientnet_conf('efficientnet_b0')` (width and depth multipliers 1.0).
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

ModuleDef = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One MBConv block: torchvision `MBConvConfig` after per-block adjustment."""
  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int
  stochastic_depth: float  # drop probability of the residual branch

  @property
  def expanded_channels(self) -> int:
    return self.in_channels * self.expand_ratio  # _make_divisible(., 8) is exact for B0

  @property
  def use_residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


def block_configs(stages=STAGES, stochastic_depth: float = 0.2) -> list[list[BlockConfig]]:
  """Per stage, its blocks; drop probability `stochastic_depth * block_index / total`."""
  total = sum(s[-1] for s in stages)
  configs, index = [], 0
  for expand, kernel, stride, cin, cout, repeats in stages:
    stage = []
    for i in range(repeats):
      stage.append(BlockConfig(expand, kernel, stride if i == 0 else 1,
                               cin if i == 0 else cout, cout,
                               stochastic_depth * index / total))
      index += 1
    configs.append(stage)
  return configs


class ConvNormAct(nn.Module):
  """torchvision `Conv2dNormActivation`: conv '0' (no bias) -> BatchNorm '1' -> activation."""
  features: int
  kernel: int
  norm: ModuleDef
  stride: int = 1
  groups: int = 1
  activation: Callable | None = nn.silu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H/stride, W/stride, features]
    pad = (self.kernel - 1) // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride,) * 2,
                padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                use_bias=False, dtype=self.dtype, kernel_init=torch_init.kaiming_normal_fan_out,
                conv_general_dilated=conv_general_dilated, name='0')(x)
    x = self.norm(name='1')(x)
    return x if self.activation is None else self.activation(x)


class MBConvLayers(nn.Module):
  """torch `MBConv.block` (an nn.Sequential): children '0', '1', ... in order."""
  cfg: BlockConfig
  attention: str
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, in] -> [B, H/stride, W/stride, out]
    cfg, mid = self.cfg, self.cfg.expanded_channels
    cna = functools.partial(ConvNormAct, norm=self.norm, dtype=self.dtype)
    expand = [functools.partial(cna, mid, 1)] if mid != cfg.in_channels else []
    layers = expand + [
        functools.partial(cna, mid, cfg.kernel, stride=cfg.stride, groups=mid),  # depthwise
        functools.partial(attention_lib.make, self.attention, cfg.in_channels,
                          dtype=self.dtype),
        functools.partial(cna, cfg.out_channels, 1, activation=None),            # project
    ]
    for i, layer in enumerate(layers):
      x = layer(name=str(i))(x)
    return x


class MBConv(nn.Module):
  """Inverted-residual block with stochastic depth on the residual branch."""
  cfg: BlockConfig
  attention: str
  norm: ModuleDef
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap batch axis: stochastic depth draws for the global batch

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = MBConvLayers(self.cfg, self.attention, self.norm, self.dtype, name='block')(x)
    if not self.cfg.use_residual:
      return y
    rate = self.cfg.stochastic_depth
    rng = self.make_rng('dropout') if train and rate > 0 else None
    return stochastic_depth(y, rate, rng, self.axis_name) + x


class Stage(nn.Module):
  """torch `features.{1..7}`: blocks named '0', '1', ..., `block(cfg)` an MBConv partial."""
  blocks: Sequence[BlockConfig]
  block: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, cfg in enumerate(self.blocks):
      x = self.block(cfg, name=str(i))(x, train)
    return x


# Activation checkpointing of a whole stage (option `remat`): `jax.checkpoint` with policy None
# (nothing inside the stage is saved for the backward pass: its forward, BatchNorm, gates and
# stochastic-depth masks included, runs again from the stage's input) and prevent_cse=True
# (else XLA's CSE can merge the recomputation with the forward under jit). `train` is static:
# static_argnums counts `self` (flax's nn.checkpoint subtracts 1), so `train` of
# `__call__(self, x, train)` is 2, and must be passed positionally. The lifted module keeps
# the name given at the call ('1' .. '7'), so parameter paths do not change.
RematStage = nn.remat(Stage, static_argnums=(2,), policy=None, prevent_cse=True)


class Features(nn.Module):
  """torch `features`: stem '0', stages '1'..'7', head conv '8'. [B,H,W,3] -> [B,H/32,W/32,1280]."""
  stages: Sequence[Sequence[BlockConfig]]
  attention: str
  norm: ModuleDef
  dtype: Any = jnp.float32
  axis_name: str | None = None
  remat: bool = False  # activation checkpointing per stage ('1' .. '7')

  @nn.compact
  def __call__(self, x, train: bool = False):
    cna = functools.partial(ConvNormAct, norm=self.norm, dtype=self.dtype)
    x = cna(STEM_CHANNELS, 3, stride=2, name='0')(x)
    block = functools.partial(MBConv, attention=self.attention, norm=self.norm,
                              dtype=self.dtype, axis_name=self.axis_name)
    stage = RematStage if self.remat else Stage
    for i, blocks in enumerate(self.stages):
      x = stage(blocks, block, name=str(i + 1))(x, train)
    return cna(HEAD_CHANNELS, 1, name=str(len(self.stages) + 1))(x)


class Classifier(nn.Module):
  """torch `classifier = Sequential(Dropout, Linear)`: the Linear is '1'."""
  num_classes: int
  dropout: float
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):  # [B, D] -> [B, num_classes]
    x = Dropout(self.dropout, self.axis_name)(x, deterministic=not train)
    # torchvision EfficientNet: U(+-1/sqrt(out_features)), bias 0.
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    kernel_init=torch_init.uniform(self.num_classes ** -0.5), name='1')(x)


class EfficientNet(nn.Module):
  """torchvision EfficientNet-B0. Input [B, H, W, 3] (ImageNet-normalised), H, W >= 32."""
  num_classes: int = 1000
  attention: str = 'se'
  dropout: float = 0.2
  stochastic_depth: float = 0.2
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  remat: bool = False  # activation checkpointing per MBConv stage (`RematStage`)

  @nn.compact
  def __call__(self, x, train: bool = False, *, bn_train: bool | None = None):
    """Classifies [B, H, W, 3] images.

    `train` switches dropout and stochastic depth (rng 'dropout', masks drawn for the global
    batch: the same numbers on any device count); `bn_train` (default `train`) uses batch
    statistics and updates 'batch_stats' (torch's unbiased running variance).

    Returns:
      (logits [B, num_classes], {'pre_logits': [B, 1280]}), both float32 (float64 for float64
      runs, `precision.py`).
    """
    if self.attention not in ATTENTION_OPTIONS:
      raise ValueError(f'unknown attention={self.attention!r}; valid: {ATTENTION_OPTIONS}')
    bn_train = train if bn_train is None else bn_train
    norm = torch_batchnorm(running=not bn_train, axis_name=self.bn_axis_name, dtype=self.dtype)
    x = Features(block_configs(STAGES, self.stochastic_depth), self.attention, norm,
                 self.dtype, self.bn_axis_name, self.remat,
                 name='features')(jnp.asarray(x, self.dtype), train)
    pre_logits = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten: [B, 1280]
    logits = Classifier(self.num_classes, self.dropout, self.dtype, self.bn_axis_name,
                        name='classifier')(pre_logits, train)
    return promote(logits), {'pre_logits': promote(pre_logits)}


@registry.register('efficientnet_b0', head=HEAD)
def efficientnet_b0(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32,
                    attention='se', dropout=0.2, stochastic_depth=0.2, remat=False):
  """torchvision efficientnet_b0; `attention` in ATTENTION_OPTIONS, pre_logits 1280.

  `remat`: activation checkpointing per MBConv stage (same parameters and numbers, less
  memory, about one more forward pass per step).
  """
  return EfficientNet(num_classes, attention, dropout, stochastic_depth, bn_axis_name, dtype,
                      remat)
