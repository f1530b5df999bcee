"""Model registry: a string name -> a factory that builds a Flax Linen module.

A model file registers its factories with one decorator line::

    @registry.register('resnet18', head=r'^fc/')
    def resnet18(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32,
                 deform='none', deform_init='random'):
      return ResNet(...)

Every factory takes `num_classes`, `bn_axis_name` and `dtype`; its other keyword
parameters are the model's options (`config.model.options`), validated by `create`.

`head` is a regex on the '/'-joined parameter path (without the 'params' collection)
that matches the classification head, used for freezing and for replacing a head of
another size when loading torchvision weights.

`torchvision` is the torchvision model name (`torchvision.models.get_model(name)`),
`torch_rules` / `torch_aliases` are the model's special rows for the torchvision
converter (see `flowers_jax/convert.py`: `TorchRule`, defined here so model files need
not import the converter). `post_load(variables, initialised, **options) -> variables` (given
the model options its signature names),
if given, runs after loading torchvision weights on the flat {'params/...': array}
dict, `initialised` being the paths no torch key filled (ResNet: copies half of the
loaded conv1 into a parallel deformable branch).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

_COMMON_ARGS = ('num_classes', 'bn_axis_name', 'dtype')


def _identity(*arrays):
  return arrays[0] if len(arrays) == 1 else arrays


@dataclasses.dataclass(frozen=True)
class TorchRule:
  """One special row of the torchvision <-> Flax table (leaves the generic rules miss).

  `torch` is one torchvision state_dict key and `flax` one or more Flax leaf paths
  ('collection/module/.../leaf'); both are templates whose `{field}` placeholders match
  one path segment and must name the same fields on both sides, e.g.

      TorchRule('encoder.layers.{layer}.self_attention.in_proj_weight',
                ('params/encoder/layers/{layer}/self_attention/query/kernel',
                 'params/encoder/layers/{layer}/self_attention/key/kernel',
                 'params/encoder/layers/{layer}/self_attention/value/kernel'),
                to_flax=split_qkv_kernel, to_torch=merge_qkv_kernel)

  `to_flax(torch_array) -> array or tuple of arrays` (one per `flax` path) and
  `to_torch(*flax_arrays) -> torch_array` must be inverses; both default to identity.
  They receive and return numpy arrays. A `to_flax` that has a keyword parameter
  `target_shapes` is also given the model's shapes of its `flax` leaves (in order),
  e.g. to resize a position embedding to another image size.
  """
  torch: str
  flax: tuple[str, ...] | str
  to_flax: Callable[..., Any] = _identity
  to_torch: Callable[..., Any] = _identity

  @property
  def flax_paths(self) -> tuple[str, ...]:
    return (self.flax,) if isinstance(self.flax, str) else tuple(self.flax)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: its factory and what the converter/optimizer need to know."""
  name: str
  factory: Callable[..., nn.Module]
  head: str
  torchvision: str
  torch_rules: tuple[TorchRule, ...] = ()
  torch_aliases: tuple[tuple[str, str], ...] = ()
  post_load: Callable[..., Any] | None = None
  no_weight_decay: str = ''  # regex on param paths exempt from weight decay (besides 1-D)

  @property
  def options(self) -> tuple[str, ...]:
    """The factory's keyword parameters besides num_classes/bn_axis_name/dtype."""
    params = inspect.signature(self.factory).parameters
    return tuple(p for p in params if p not in _COMMON_ARGS)


_MODELS: dict[str, ModelSpec] = {}
HEAD_PATTERNS: dict[str, str] = {}


def register(name: str, *, head: str, torchvision: str | None = None,
             torch_rules=(), torch_aliases=(), post_load=None, no_weight_decay: str = ''):
  """Decorator registering `factory` under `name`; returns the factory unchanged.

  Args:
    name: registry key, e.g. 'resnet18'.
    head: regex on '/'-joined param paths matching the classifier, e.g. r'^fc/'.
    torchvision: torchvision model name if it differs from `name` ('vit_b_16').
    torch_rules: `TorchRule`s for leaves the converter's generic rules do not cover.
    torch_aliases: (regex, replacement) pairs applied to incoming torch keys, for
      older state_dict key names, e.g. (r'\\.mlp\\.linear_1\\.', '.mlp.0.').
    post_load: optional hook run by the converter after loading torchvision weights,
      `post_load(flat_variables, initialised_paths, **model_options) -> flat_variables`.
    no_weight_decay: regex on param paths that weight decay skips besides biases and norm
      scales (which `optim` always skips), e.g. ViT's position embedding and class token.
  """
  def decorator(factory):
    if name in _MODELS:
      raise ValueError(f'model {name!r} is registered twice')
    missing = [a for a in _COMMON_ARGS if a not in inspect.signature(factory).parameters]
    if missing:
      raise TypeError(f'factory for {name!r} must accept {missing}')
    re.compile(head)
    _MODELS[name] = ModelSpec(name, factory, head, torchvision or name,
                              tuple(torch_rules), tuple(torch_aliases), post_load,
                              no_weight_decay)
    HEAD_PATTERNS[name] = head
    return factory
  return decorator


def names() -> list[str]:
  """The registered model names, sorted."""
  return sorted(_MODELS)


def spec(name: str) -> ModelSpec:
  """The `ModelSpec` of `name`; ValueError listing the known names otherwise."""
  if name not in _MODELS:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(names())}')
  return _MODELS[name]


def create(name: str, num_classes: int = 1000, *, bn_axis_name: str | None = None,
           dtype: Any = jnp.float32, **options) -> nn.Module:
  """Builds the Flax module registered as `name`.

  Args:
    name: one of `names()`.
    num_classes: size of the classification head.
    bn_axis_name: pmap axis name over which BatchNorm averages batch statistics.
    dtype: computation dtype; parameters stay float32.
    **options: model options (e.g. ResNet `deform`); unknown ones raise a TypeError
      that lists the valid ones.
  """
  s = spec(name)
  unknown = sorted(set(options) - set(s.options))
  if unknown:
    raise TypeError(f'unknown option(s) {unknown} for model {name!r}; '
                    f'valid options: {list(s.options) or "none"}')
  return s.factory(num_classes=num_classes, bn_axis_name=bn_axis_name, dtype=dtype,
                   **options)
