"""Input normalisation on the device: uint8 batches in, the models' float input out.

Batches leave the host as uint8 (a quarter of float32's bytes: `data.pipeline`); the train and
eval steps normalise them first, with the run's `data.mean` / `data.std` (ImageNet's, or the
weights' own: timm's ViTs use 0.5 / 0.5):

    x = normalize(images, mean, std)              # uint8 [B, H, W, 3] -> float32, (x/255 - m)/s
    batch = normalize_batch(batch, mean, std)     # 'image', 'positive', 'negative' keys

A floating-point image is taken as already normalised and passed through unchanged: that is
the models' own input contract (`models.create`), what tests and `predict.Run.logits` callers
with their own preprocessing give. Only uint8 means pixels. No TensorFlow here.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

IMAGE_KEYS = ('image', 'positive', 'negative')
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights (data.mean=())
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              dtype=jnp.float32):
  """uint8 [..., 3] pixels -> `dtype` ((x / 255 - mean) / std); floats pass through unchanged.

  The arithmetic is `transforms.normalize`'s (the host reference), in float32: equal to it to
  float32 rounding.
  """
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def normalize_batch(batch: dict, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> dict:
  """`batch` with its image keys (`IMAGE_KEYS`) normalised (`normalize`)."""
  return {k: normalize(v, mean, std) if k in IMAGE_KEYS else v for k, v in batch.items()}
