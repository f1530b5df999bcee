"""ResNet-18/34/50, torchvision-exact, in Flax Linen (NHWC).

Matches `torchvision.models.resnet{18,34,50}` (v1.5: the stride sits on the 3x3 conv
of a Bottleneck) so that converted torchvision weights give the same outputs:

- explicit symmetric padding (k // 2 on each side), never 'SAME' (it pads stride-2
  convs asymmetrically);
- BatchNorm eps 1e-5, Flax momentum 0.9 (= 1 - torch momentum 0.1), two-pass variance,
  running variance updated with the unbiased batch variance (`layers/norm.py`);
- submodule names mirror the torchvision state_dict keys, so the Flax path
  ('layer1', '0', 'conv1', 'kernel') is torch 'layer1.0.conv1.weight' and
  ('layer1', '0', 'downsample', '1', 'mean') is 'layer1.0.downsample.1.running_mean';
- initialisers follow torchvision (`layers/torch_init.py`: Kaiming-normal fan-out convs,
  BN scale 1 / bias 0, `nn.Linear`'s U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for `fc`), so a
  fresh head is initialised like the torch code that replaces `model.fc`.

`model.apply(variables, x)` returns `(logits [B, num_classes], {'pre_logits': [B, D]})`,
pre_logits the pooled features (D = 512; 2048 for ResNet-50). ResNet-18 with 1000 classes
has 11,689,512 parameters.

Intermediate feature maps for parity tests: `apply(..., capture_intermediates=True,
mutable=['intermediates'])` records every submodule's output ('conv1', 'bn1',
('layer1', '0') ...); the stem output after the max-pool is sown as 'stem'.

Deformable convolutions (the study's modification; `layers/deform.py`), option `deform`:
  'none'            torchvision's ResNet;
  'after_conv1'     x -> conv1 -> deform 3x3 64->64 (`deform_after_conv1`) -> bn1 -> ...;
  'parallel_conv1'  conv1(x) + deform 7x7/2 pad 3 3->64 (`deform_parallel_conv1`)(x) -> bn1;
  'every_stage'     a deform 3x3 C->C after each stage (`layer1_deform` .. `layer4_deform`).
Each has a bias and a zero-initialised offset predictor (so zero offsets at init);
their names are no torchvision keys, so the converter reports them 'initialised'.
Option `deform_init`, the deformable kernels' init:
  'random'      (the study) torchvision DeformConv2d's default, kernel and bias
                U(+-1/sqrt(fan_in)): the network no longer computes the pretrained
                function at step 0;
  'pretrained'  (the study's proposed fix) the network starts as the plain ResNet:
                after_conv1 / every_stage: the identity (kernel = delta at the centre
                tap, bias 0); parallel_conv1: kernel 0 at `init`, and when torchvision
                weights are loaded (`torchvision_post_load`) conv1 and the deformable
                branch each get half of the pretrained conv1 kernel (bias 0), so their
                sum is the pretrained conv1 and both branches (and, through the
                non-zero deformable kernel, the offsets) get gradients from step 0.

Option `remat` (default False): activation checkpointing per stage (`layer1` .. `layer4`,
`RematStage`): the backward pass recomputes each stage's forward from its input instead of
keeping its activations. Same parameter paths, same numbers (BatchNorm statistics included),
less memory, about one more forward pass of compute per step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flowers_jax.models import registry
from flowers_jax.models.layers import deform as deform_layers
from flowers_jax.models.layers import torch_init
from flowers_jax.models.layers.conv import conv_general_dilated
from flowers_jax.models.layers.norm import torch_batchnorm
from flowers_jax.precision import promote

HEAD = r'^fc/'
# Deformable-convolution placements (see the module docstring).
DEFORM_OPTIONS = ('none', 'after_conv1', 'parallel_conv1', 'every_stage')
DEFORM_INIT_OPTIONS = ('random', 'pretrained')

ModuleDef = Callable[..., nn.Module]

def identity_kernel_init(key, shape, dtype=jnp.float32):
  """[kh, kw, C, C] kernel of the identity conv: a delta at the centre tap."""
  del key
  kh, kw, c_in, c_out = shape
  if c_in != c_out or kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f'an identity kernel needs C_in == C_out and odd kh, kw; got {shape}')
  return jnp.zeros(shape, dtype).at[kh // 2, kw // 2].set(jnp.eye(c_in, dtype=dtype))


def torchvision_post_load(variables: dict[str, Any], initialised: Sequence[str], *,
                          deform: str = 'none', deform_init: str = 'random'):
  """Converter hook: splits the loaded conv1 over conv1 and the parallel deform branch.

  For deform='parallel_conv1', deform_init='pretrained', when torchvision weights
  filled conv1 and the branch's kernel was freshly initialised: conv1 and the branch
  get half of the loaded kernel W each, so at zero offsets their sum is conv(x, W).
  Anything else (a converted checkpoint that already holds the branch) is unchanged.

  Args:
    variables: {'params/conv1/kernel': array, ...} (flat, '/'-joined paths).
    initialised: the paths the converter initialised rather than loaded.
  """
  branch = 'params/deform_parallel_conv1/kernel'
  if (deform, deform_init) != ('parallel_conv1', 'pretrained') or branch not in initialised:
    return variables
  half = np.asarray(variables['params/conv1/kernel']) / 2
  return {**variables, 'params/conv1/kernel': half, branch: half.copy()}


def conv(features: int, kernel: int, stride: int = 1, *, name: str,
         dtype: Any = jnp.float32) -> nn.Conv:
  """Bias-free k x k conv with torch's symmetric padding k // 2."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 kernel_init=torch_init.kaiming_normal_fan_out,
                 conv_general_dilated=conv_general_dilated,
                 name=name)


class Downsample(nn.Module):
  """torch `downsample = Sequential(conv1x1, BatchNorm)`: children named '0' and '1'."""
  features: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H/s, W/s, features]
    x = self.conv(self.features, 1, self.stride, name='0')(x)
    return self.norm(name='1')(x)


class BasicBlock(nn.Module):
  """3x3 -> 3x3 residual block (ResNet-18/34). Output channels: `features`."""
  features: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  expansion = 1

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H/stride, W/stride, features]
    y = self.conv(self.features, 3, self.stride, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, 3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    return nn.relu(y + shortcut(self, x))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 block (ResNet-50). Output channels: 4 * `features`."""
  features: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  expansion = 4

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H/stride, W/stride, 4 * features]
    y = self.conv(self.features, 1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, 3, self.stride, name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.features * 4, 1, name='conv3')(y)
    y = self.norm(name='bn3')(y)
    return nn.relu(y + shortcut(self, x))


def shortcut(block, x):
  """Identity, or the block's 'downsample' projection when the shape changes."""
  out = block.features * block.expansion
  if block.stride == 1 and x.shape[-1] == out:
    return x
  return Downsample(out, block.stride, block.conv, block.norm, name='downsample')(x)


class Stage(nn.Module):
  """torch `layerN`: `num_blocks` blocks named '0', '1', ...; the first one strides."""
  block: ModuleDef
  num_blocks: int
  features: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_blocks):
      x = self.block(self.features, self.stride if i == 0 else 1, self.conv, self.norm,
                     name=str(i))(x)
    return x


# Activation checkpointing of a whole stage (option `remat`): `jax.checkpoint` with policy None
# (nothing inside the stage is saved for the backward pass; only the stage's input is kept and
# its forward, BatchNorm included, runs again in the backward pass) and prevent_cse=True (else
# XLA's CSE can merge the recomputation with the forward under jit and undo it). The lifted
# module keeps the name given at the call (`layer1` ...), so parameter paths do not change.
# Stage.__call__ has no flag to make static: BatchNorm's mode is a field of its `norm`.
RematStage = nn.remat(Stage, policy=None, prevent_cse=True)


class ResNet(nn.Module):
  """torchvision ResNet. Input [B, H, W, 3] (ImageNet-normalised), any H, W >= 32."""
  stage_sizes: Sequence[int]
  block: ModuleDef
  num_classes: int = 1000
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  deform: str = 'none'
  deform_init: str = 'random'
  remat: bool = False  # activation checkpointing per stage (`layer1` .. `layer4`)

  def _check_options(self):
    if self.deform not in DEFORM_OPTIONS:
      raise ValueError(f'unknown deform={self.deform!r}; valid: {DEFORM_OPTIONS}')
    if self.deform_init not in DEFORM_INIT_OPTIONS:
      raise ValueError(f'unknown deform_init={self.deform_init!r}; '
                       f'valid: {DEFORM_INIT_OPTIONS}')

  def _deform(self, x, features: int, kernel: int, stride: int, *, name: str,
              identity: bool):
    """A deformable k x k conv, padding k // 2, with `deform_init`'s initialisers.

    `identity`: the layer is stacked on the network (after_conv1, every_stage) and
    starts as the identity under deform_init='pretrained'; otherwise it is a branch
    added to conv1 and starts at 0 (`torchvision_post_load` sets half of conv1).
    """
    if self.deform_init == 'random':  # torchvision.ops.DeformConv2d.reset_parameters
      kernel_init = torch_init.kaiming_uniform_a_sqrt5
      bias_init = torch_init.uniform_fan_in(kernel * kernel * x.shape[-1])
    else:
      kernel_init = identity_kernel_init if identity else nn.initializers.zeros
      bias_init = nn.initializers.zeros
    return deform_layers.DeformConv(
        features, kernel, strides=stride, padding=kernel // 2, kernel_init=kernel_init,
        bias_init=bias_init, dtype=self.dtype, name=name)(x)

  def _stem(self, x, conv, norm):
    """conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2: [B, H, W, 3] -> [B, H/4, W/4, 64].

    With the deformable conv after conv1 or parallel to it (summed) before bn1.
    """
    y = conv(64, 7, 2, name='conv1')(x)
    if self.deform == 'after_conv1':
      y = self._deform(y, 64, 3, 1, name='deform_after_conv1', identity=True)
    elif self.deform == 'parallel_conv1':
      y = y + self._deform(x, 64, 7, 2, name='deform_parallel_conv1', identity=False)
    x = norm(name='bn1')(y)
    x = nn.relu(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  @nn.compact
  def __call__(self, x, train: bool = False, *, bn_train: bool | None = None):
    """Classifies [B, H, W, 3] images.

    `train` has no effect besides being the default of `bn_train` (ResNet has no
    dropout); `bn_train` uses batch statistics and updates 'batch_stats'.

    Returns:
      (logits [B, num_classes], {'pre_logits': [B, D]}), float32 (float64 for float64
      runs, `precision.py`); D is the
      pooled width, 512 (ResNet-18/34) or 2048 (ResNet-50).
    """
    self._check_options()
    bn_train = train if bn_train is None else bn_train
    conv_ = functools.partial(conv, dtype=self.dtype)
    norm = torch_batchnorm(running=not bn_train, axis_name=self.bn_axis_name, dtype=self.dtype)

    x = self._stem(jnp.asarray(x, self.dtype), conv_, norm)
    self.sow('intermediates', 'stem', x)
    stage = RematStage if self.remat else Stage
    for i, num_blocks in enumerate(self.stage_sizes):
      x = stage(self.block, num_blocks, 64 * 2 ** i, 1 if i == 0 else 2, conv_, norm,
                name=f'layer{i + 1}')(x)
      if self.deform == 'every_stage':
        x = self._deform(x, x.shape[-1], 3, 1, name=f'layer{i + 1}_deform', identity=True)
    pre_logits = jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1, flattened
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=torch_init.kaiming_uniform_a_sqrt5,
                      bias_init=torch_init.uniform_fan_in(pre_logits.shape[-1]),
                      name='fc')(pre_logits)
    return promote(logits), {'pre_logits': promote(pre_logits)}


@registry.register('resnet18', head=HEAD, post_load=torchvision_post_load)
def resnet18(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32,
             deform='none', deform_init='random', remat=False):
  """torchvision resnet18: BasicBlocks [2, 2, 2, 2], pre_logits 512."""
  return ResNet((2, 2, 2, 2), BasicBlock, num_classes, bn_axis_name, dtype, deform,
                deform_init, remat)


@registry.register('resnet34', head=HEAD, post_load=torchvision_post_load)
def resnet34(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32,
             deform='none', deform_init='random', remat=False):
  """torchvision resnet34: BasicBlocks [3, 4, 6, 3], pre_logits 512."""
  return ResNet((3, 4, 6, 3), BasicBlock, num_classes, bn_axis_name, dtype, deform,
                deform_init, remat)


@registry.register('resnet50', head=HEAD, post_load=torchvision_post_load)
def resnet50(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32,
             deform='none', deform_init='random', remat=False):
  """torchvision resnet50: Bottlenecks [3, 4, 6, 3], pre_logits 2048."""
  return ResNet((3, 4, 6, 3), Bottleneck, num_classes, bn_axis_name, dtype, deform,
                deform_init, remat)
