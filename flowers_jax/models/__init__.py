"""Vision backbones as Flax Linen modules, built by name.

    from flowers_jax import models
    model = models.create('resnet18', num_classes=102)
    models.names()               # ['resnet18', 'resnet34', ...]
    models.HEAD_PATTERNS[name]   # regex on param paths matching the classifier head
    logits, out = model.apply(variables, x, train=False)  # x [B, H, W, 3]

Every model returns `(logits [B, num_classes], {'pre_logits': [B, D]})`, both float32 for
float32 and bfloat16 runs, float64 for float64 ones (`flowers_jax/precision.py`), pre_logits
being the features the classifier head acts on (big_vision's convention).

Each model file registers itself with `@registry.register(name, head=...)`; importing
it below is all a new model needs.
"""

from flowers_jax.models.registry import (HEAD_PATTERNS, ModelSpec, TorchRule, create, names,
                                        register, spec)

# Model files: importing registers them.
from flowers_jax.models import efficientnet, resnet, vit  # noqa: F401

__all__ = ['HEAD_PATTERNS', 'ModelSpec', 'TorchRule', 'create', 'names', 'register', 'spec']
