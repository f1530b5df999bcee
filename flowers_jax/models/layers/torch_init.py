"""torch's default initialisers as Flax initialisers, each written once.

Named after the torch call they reproduce (same distribution; the draws differ, being jax's):

- `kaiming_normal_fan_out`: `nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`,
  an untruncated N(0, 2 / fan_out); torchvision's ResNet and EfficientNet convs.
- `kaiming_uniform_a_sqrt5`: `nn.init.kaiming_uniform_(w, a=math.sqrt(5))`, the default weight
  init of `nn.Linear` / `nn.Conv{1,2}d` (`reset_parameters`): U(+-1/sqrt(fan_in)).
- `uniform(bound)`: `nn.init.uniform_(w, -bound, bound)`; `uniform_fan_in(fan_in)` is the
  default bias init of `nn.Linear` / `nn.Conv{1,2}d`, U(+-1/sqrt(fan_in)), where fan_in is the
  layer's (in_features, or kh * kw * C_in / groups), not the bias's.

Flax kernels are [..., C_in, C_out] (Dense [in, out], Conv [k.., in, out]), so Flax's fan_in /
fan_out of a kernel equal torch's of the transposed weight.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., Any]

kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# gain^2 = 2 / (1 + a^2) = 1/3 with a = sqrt(5): bound sqrt(3 * (1/3) / fan_in) = 1/sqrt(fan_in).
kaiming_uniform_a_sqrt5: Initializer = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def uniform(bound: float) -> Initializer:
  """torch `nn.init.uniform_(w, -bound, bound)`."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def uniform_fan_in(fan_in: int) -> Initializer:
  """torch's default `nn.Linear` / `nn.Conv2d` bias init, U(+-1/sqrt(fan_in))."""
  return uniform(fan_in ** -0.5)
