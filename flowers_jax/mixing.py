"""Mixup / CutMix on the device, inside the jitted train step, as timm's `Mixup(mode='batch')`.

timm (timm/data/mixup.py, `Mixup` with prob=1.0, correct_lam=True, mode='batch') draws one set
of parameters per batch and pairs row i with row B-1-i (`x.flip(0)`):

- mixup only (cutmix_alpha == 0): lam ~ Beta(mixup_alpha, mixup_alpha),
  x = lam * x + (1 - lam) * x.flip(0).
- cutmix only (mixup_alpha == 0): lam ~ Beta(cutmix_alpha, cutmix_alpha), a box of
  int(H*sqrt(1-lam)) x int(W*sqrt(1-lam)) centred at a uniform pixel (cy in [0, H), cx in
  [0, W)), clipped to the image, is pasted from x.flip(0); lam becomes 1 - box area / (H*W).
- both > 0: cutmix with probability switch_prob (its lam from Beta(cutmix_alpha)), else mixup.
- both 0: nothing is mixed (lam = 1).

Targets: one-hot with label smoothing (off = smoothing / K, on = 1 - smoothing + off, timm's
`mixup_target`), then lam * t + (1 - lam) * t.flip(0). Train on them with `soft_cross_entropy`
(timm's `SoftTargetCrossEntropy`).

Sharding. Under `jax.jit` with the batch sharded over devices, `x[::-1]` is the global flip,
what timm does on one GPU (XLA moves the rows between devices). Under `jax.pmap` (or shard_map)
each device sees its own shard: with `axis_name=None` the flip pairs rows *within each device's
shard*; with `axis_name` given the local flip is followed by a `ppermute` from device d to
device n-1-d, which is the flip of the global batch (row i pairs with row B-1-i as in timm).
Either way pass the same rng on every device (not one folded with the axis index): lam /
use_cutmix / box are then identical on all, as timm's one draw per batch.

Numerics: lam is drawn in float32; the box size int(H*sqrt(1-lam)) is computed as timm does in
float64 from that lam (`_cut_size`), so timm given our lam and centre yields our box.

Note that timm's own DistributedDataParallel training mixes each GPU's local batch, i.e. the
`axis_name=None` pairing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _cut_size(lam: Array, n: int) -> Array:
  """int(n * sqrt(1 - lam)) as int32, as timm computes it in float64 from a float32 lam.

  In float32, 1 - lam rounds to 1 for lam < 3e-8 (not rare with small alphas: about 1 in 250
  draws of Beta(0.3, 0.3)), giving n where timm gets n - 1; in float64 that happens only for
  lam <= 2^-54. The float32 estimate k (off by at most one) is corrected with k valid <=>
  lam <= (n^2 - k^2) / n^2 (n^2 is exact in float32 for n < 4096), for k = n: lam <= 2^-54.
  """
  k = jnp.floor(n * jnp.sqrt(1.0 - lam)).astype(jnp.int32)

  def fits(k):
    t = (n * n - k * k).astype(jnp.float32) / jnp.float32(n * n)
    return lam <= jnp.where(k == n, jnp.float32(2.0**-54), t)

  k = jnp.where((k > 0) & ~fits(k), k - 1, k)
  return jnp.where((k < n) & fits(k + 1), k + 1, k)


def cutmix_box(lam: Array, cy: Array, cx: Array, image_hw: tuple[int, int]):
  """timm's `rand_bbox` + `cutmix_bbox_and_lam(correct_lam=True)` for a given box centre.

  lam: the Beta draw (scalar); cy, cx: the centre (int scalars, cy in [0, H), cx in [0, W)).
  Returns ((y0, y1, x0, x1) int32, lam corrected to 1 - box area / (H*W), float32). The box
  covers rows y0 <= y < y1 and columns x0 <= x < x1.
  """
  h, w = image_hw
  lam = jnp.asarray(lam, jnp.float32)
  cut_h, cut_w = _cut_size(lam, h), _cut_size(lam, w)
  y0 = jnp.clip(cy - cut_h // 2, 0, h).astype(jnp.int32)
  y1 = jnp.clip(cy + (cut_h + 1) // 2, 0, h).astype(jnp.int32)
  x0 = jnp.clip(cx - cut_w // 2, 0, w).astype(jnp.int32)
  x1 = jnp.clip(cx + (cut_w + 1) // 2, 0, w).astype(jnp.int32)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return (y0, y1, x0, x1), 1.0 - area / jnp.float32(h * w)


def mix_params(rng: Array, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
               image_hw: tuple[int, int]) -> dict:
  """One batch's mixing parameters, drawn as timm's `Mixup._params_per_batch` (prob=1.0).

  The alphas, switch_prob and image_hw (H, W) are static. Returns a dict of scalars:
  'lam' float32 (corrected for cutmix), 'use_cutmix' bool, 'box' (y0, y1, x0, x1) int32
  (empty, all 0, for mixup), and the raw draws 'lam_beta' (the Beta sample) and
  'centre' (cy, cx) int32.
  """
  k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(rng, 5)
  h, w = image_hw
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    lam_beta = jnp.where(use_cutmix, jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha),
                         jax.random.beta(k_mix, mixup_alpha, mixup_alpha))
  elif mixup_alpha > 0:
    use_cutmix = jnp.asarray(False)
    lam_beta = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
  elif cutmix_alpha > 0:
    use_cutmix = jnp.asarray(True)
    lam_beta = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
  else:
    use_cutmix = jnp.asarray(False)
    lam_beta = jnp.float32(1.0)
  lam_beta = jnp.asarray(lam_beta, jnp.float32)
  cy = jax.random.randint(k_cy, (), 0, h, jnp.int32)
  cx = jax.random.randint(k_cx, (), 0, w, jnp.int32)
  box, lam_cut = cutmix_box(lam_beta, cy, cx, image_hw)
  box = tuple(jnp.where(use_cutmix, b, 0).astype(jnp.int32) for b in box)
  return {'lam': jnp.where(use_cutmix, lam_cut, lam_beta), 'use_cutmix': use_cutmix,
          'box': box, 'lam_beta': lam_beta, 'centre': (cy, cx)}


def _flip(x: Array, axis_name: str | None) -> Array:
  """x[::-1] on the leading axis; with `axis_name`, the flip of the batch over that axis."""
  x = x[::-1]
  if axis_name is None:
    return x
  n = jax.lax.axis_size(axis_name)
  return jax.lax.ppermute(x, axis_name, [(d, n - 1 - d) for d in range(n)])


def apply(params: dict, images: Array, targets: Array, *,
          axis_name: str | None = None) -> tuple[Array, Array]:
  """Mix images [B, H, W, C] and targets [B, K] (float) with `mix_params`' parameters.

  Mixup: lam * x + (1 - lam) * x.flip(0); cutmix: the box of x.flip(0) pasted into x. Targets:
  lam * t + (1 - lam) * t.flip(0). Computes in float32 (float64 for float64 inputs) and returns
  the inputs' dtypes. See the module docstring for `axis_name` (pmap pairing).
  """
  lam, (y0, y1, x0, x1) = params['lam'], params['box']
  dtype = jnp.promote_types(images.dtype, jnp.float32)
  x = images.astype(dtype)
  xf = _flip(x, axis_name)
  rows = jnp.arange(images.shape[1])[:, None]
  cols = jnp.arange(images.shape[2])[None, :]
  in_box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  lam_x = lam.astype(dtype)
  mixed = jnp.where(params['use_cutmix'], jnp.where(in_box, xf, x), lam_x * x + (1 - lam_x) * xf)
  tdtype = jnp.promote_types(targets.dtype, jnp.float32)
  t = targets.astype(tdtype)
  lam_t = lam.astype(tdtype)
  mixed_t = lam_t * t + (1 - lam_t) * _flip(t, axis_name)
  return mixed.astype(images.dtype), mixed_t.astype(targets.dtype)


def smooth_one_hot(labels: Array, num_classes: int, smoothing: float = 0.0) -> Array:
  """labels [B] int -> [B, K] float32: on = 1 - smoothing + smoothing/K, off = smoothing/K."""
  off = smoothing / num_classes
  return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_),
                   jnp.float32(1.0 - smoothing + off), jnp.float32(off))


def mix_batch(rng: Array, images: Array, labels: Array, num_classes: int, *, mixup_alpha: float,
              cutmix_alpha: float, switch_prob: float = 0.5, label_smoothing: float = 0.0,
              axis_name: str | None = None) -> tuple[Array, Array]:
  """timm's `Mixup(mode='batch', prob=1.0)(images, labels)`, with images [B, H, W, C] (NHWC).

  Returns (mixed images [B, H, W, C] in the images' dtype, soft targets [B, K] float32). With
  both alphas 0 the images come back unchanged and the targets are the smoothed one-hots.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if not (mixup_alpha > 0 or cutmix_alpha > 0):
    return images, targets
  params = mix_params(rng, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                      switch_prob=switch_prob, image_hw=tuple(images.shape[1:3]))
  return apply(params, images, targets, axis_name=axis_name)


def soft_cross_entropy(logits: Array, targets: Array) -> Array:
  """timm's SoftTargetCrossEntropy: -(targets * log_softmax(logits)).sum(-1).mean(), a scalar.

  logits, targets [B, K]; computes in float32 (float64 for float64 logits).
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  return -(targets.astype(dtype) * logp).sum(-1).mean()
