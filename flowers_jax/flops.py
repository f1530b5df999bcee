"""Model FLOPs per image and model-FLOPs utilisation (MFU); no jax, torch or tensorflow.

Forward FLOPs (multiply and add counted as 2, convolutions and matmuls only, as fvcore and
torchvision's `GFLOPS x 2` count them) per 224-px image:

  resnet18 3.63 G, resnet34 7.33 G, resnet50 8.18 G, efficientnet_b0 0.80 G, vit_b16 35.2 G,
  vit_b32 8.82 G, vit_l16 123.1 G (torchvision's 4.41 / 61.55 GFLOPS x 2).

Other sizes:
  convnets  x (size / 224)^2: every layer's output map scales with the input area (the
            global pool and the head are negligible);
  ViTs      by token count N = (size / P)^2 + 1 against N_224 at 224 px (P the patch size):
            the projections and MLP (24 N D^2 per layer) grow with N, the attention matrices
            (4 N^2 D per layer) with N^2. With `VITS`' share s of attention at 224 px
            (vit_b16: 4.1%), flops(N) = flops_224 x ((1 - s) r + s r^2), r = N / N_224.
  resnet18 with deformable convs (`resnet18_deform_<placement>`, placements as in
            `models/resnet.py`) adds each deformable conv and its offset-predicting conv
            (2 k^2 outputs, same kernel), 2 k^2 C_in C_out H_out W_out each: +1.18 G
            after_conv1, +0.60 G parallel_conv1, +1.05 G every_stage at 224 px; the bilinear
            sampling is not counted (no multiply-adds in a matmul unit).

Training ~ 3x forward (backward = gradients w.r.t. activations and weights, 2x forward).

MFU = achieved model FLOP/s / the device's dense peak for the compute dtype (`PEAKS`, matched
on `device_kind` as jax's `Device.device_kind` or `torch.cuda.get_device_name()` spell it).
float32 is counted against the TF32 tensor-core peak, which XLA uses for float32 dots and
convolutions on GPUs by default (torch uses it for cuDNN convolutions, not for matmuls unless
`torch.backends.cuda.matmul.allow_tf32`). Devices not in the table (CPUs) give None.
"""

from __future__ import annotations

import re
from typing import Any

FORWARD_GFLOPS_224 = {
    'resnet18': 3.63,
    'resnet34': 7.33,
    'resnet50': 8.18,
    'efficientnet_b0': 0.80,
    'vit_b16': 35.2,
    'vit_b32': 8.82,
    'vit_l16': 123.1,
}
CONVNETS = ('resnet18', 'resnet34', 'resnet50', 'efficientnet_b0')

# Deformable convs at 224 px: (kernel, C_in, C_out, output side); each has an offset conv
# with the same kernel and 2 k^2 outputs.
DEFORM_LAYERS = {
    'after_conv1': [(3, 64, 64, 112)],
    'parallel_conv1': [(7, 3, 64, 112)],
    'every_stage': [(3, 64, 64, 56), (3, 128, 128, 28), (3, 256, 256, 14), (3, 512, 512, 7)],
}

# ViT -> (patch size P, attention's share of the forward FLOPs at 224 px: L 4 N^2 D / total).
VITS = {
    'vit_b16': (16, 0.041),  # 12 x 4 x 197^2 x 768 / 35.2 G
    'vit_b32': (32, 0.010),  # 12 x 4 x 50^2 x 768 / 8.82 G
    'vit_l16': (16, 0.031),  # 24 x 4 x 197^2 x 1024 / 123.1 G
}

# (regex on device_kind, {dtype: dense peak TFLOP/s}); the first match wins, so the more
# specific names come first. NVIDIA's data sheets (dense, without sparsity); Google's for TPUs.
PEAKS = [
    (r'H100.*PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
    (r'H100 NVL|H200 NVL', {'bfloat16': 835.0, 'float32': 418.0}),
    (r'H100|H200|GH200', {'bfloat16': 989.0, 'float32': 494.5}),  # SXM
    (r'A100', {'bfloat16': 312.0, 'float32': 156.0}),
    (r'L4\b', {'bfloat16': 121.0, 'float32': 60.0}),
    (r'TPU v4', {'bfloat16': 275.0}),
    (r'TPU v5 lite|TPU v5e', {'bfloat16': 197.0}),
    (r'TPU v5p|TPU v5$', {'bfloat16': 459.0}),
    (r'TPU v6', {'bfloat16': 918.0}),
]


def _deform_gflops(placement: str) -> float:
  """Extra forward GFLOPs of `placement`'s deformable and offset convs at 224 px."""
  return sum(2 * k * k * cin * (cout + 2 * k * k) * side * side
             for k, cin, cout, side in DEFORM_LAYERS[placement]) / 1e9


def _base_and_deform(model: str) -> tuple[str, str | None]:
  """'resnet18_deform_after_conv1' -> ('resnet18', 'after_conv1'); 'vit_b16' -> (.., None)."""
  base, _, placement = model.partition('_deform_')
  return base, (placement or None)


def known(model: str) -> bool:
  base, placement = _base_and_deform(model)
  return base in FORWARD_GFLOPS_224 and (placement is None or placement in DEFORM_LAYERS)


def forward_gflops(model: str, image_size: int = 224) -> float:
  """Forward GFLOPs of one `image_size` x `image_size` image (see the module docstring)."""
  if not known(model):
    valid = list(FORWARD_GFLOPS_224) + [f'resnet18_deform_{p}' for p in DEFORM_LAYERS]
    raise ValueError(f'no FLOPs for model {model!r}; valid: {", ".join(valid)}')
  base, placement = _base_and_deform(model)
  if base in VITS:
    patch, share = VITS[base]
    r = ((image_size // patch) ** 2 + 1) / ((224 // patch) ** 2 + 1)
    return FORWARD_GFLOPS_224[base] * ((1 - share) * r + share * r * r)
  at_224 = FORWARD_GFLOPS_224[base] + (_deform_gflops(placement) if placement else 0.0)
  return at_224 * (image_size / 224) ** 2


def train_gflops(model: str, image_size: int = 224) -> float:
  """Forward + backward GFLOPs per image: 3x forward."""
  return 3 * forward_gflops(model, image_size)


def dtype_name(dtype: Any) -> str:
  """'bfloat16' for jnp.bfloat16, np.dtype('bfloat16'), torch.bfloat16 or 'bfloat16'."""
  name = getattr(dtype, 'name', None) or getattr(dtype, '__name__', None) or str(dtype)
  return str(name).rsplit('.', 1)[-1]


def peak_tflops(device_kind: str, dtype: Any = 'bfloat16') -> float | None:
  """Dense peak TFLOP/s of `device_kind` for `dtype`, or None if not in `PEAKS`."""
  for pattern, peaks in PEAKS:
    if re.search(pattern, device_kind or '', re.IGNORECASE):
      return peaks.get(dtype_name(dtype))
  return None


def mfu(model: str, image_size: int, images_per_s: float, device_kind: str,
        dtype: Any = 'bfloat16', *, training: bool = True) -> float | None:
  """Model-FLOPs utilisation in [0, 1] of a run at `images_per_s`, or None when unknown.

  `training`: FLOPs per image are 3x forward (False: inference, 1x).
  None when the model's FLOPs or the device's peak for `dtype` are not known.
  """
  peak = peak_tflops(device_kind, dtype)
  if peak is None or not known(model):
    return None
  per_image = train_gflops(model, image_size) if training else forward_gflops(model, image_size)
  return images_per_s * per_image / (peak * 1e3)
