"""flowers_jax.flops: FLOPs per image, peaks and MFU."""

import subprocess
import sys

import numpy as np
import pytest

from flowers_jax import flops


@pytest.mark.parametrize('model, gflops', [('resnet18', 3.63), ('efficientnet_b0', 0.80),
                                           ('vit_b16', 35.2), ('vit_b32', 8.82),
                                           ('vit_l16', 123.1)])
def test_forward_gflops_at_224(model, gflops):
  assert flops.forward_gflops(model, 224) == pytest.approx(gflops)
  assert flops.train_gflops(model, 224) == pytest.approx(3 * gflops)


def test_convnets_scale_with_area():
  assert flops.forward_gflops('resnet18', 112) == pytest.approx(3.63 / 4)
  assert flops.forward_gflops('efficientnet_b0', 448) == pytest.approx(0.80 * 4)


def test_vit_scales_with_tokens():
  """65 tokens at 128 px: mostly linear in N, plus the N^2 attention share."""
  r = 65 / 197
  expected = 35.2 * (0.959 * r + 0.041 * r * r)
  assert flops.forward_gflops('vit_b16', 128) == pytest.approx(expected)
  assert flops.forward_gflops('vit_b16', 384) > 35.2 * (577 / 197)  # attention grows faster
  r = 145 / 50  # B/32 at 384 px: 12 x 12 patches + the class token, against 7 x 7 + 1
  assert flops.forward_gflops('vit_b32', 384) == pytest.approx(8.82 * (0.99 * r + 0.01 * r * r))


def test_deform_adds_its_convs():
  """after_conv1: a 3x3 64->64 conv and its 64->18 offset conv on 112x112 maps."""
  extra = 2 * 9 * 64 * (64 + 18) * 112 ** 2 / 1e9
  assert flops.forward_gflops('resnet18_deform_after_conv1') == pytest.approx(3.63 + extra)
  assert flops.forward_gflops('resnet18_deform_parallel_conv1', 112) == pytest.approx(
      (3.63 + 2 * 49 * 3 * (64 + 98) * 112 ** 2 / 1e9) / 4)


def test_unknown_model_says_what_is_valid():
  with pytest.raises(ValueError, match='valid: resnet18'):
    flops.forward_gflops('resnet19')


@pytest.mark.parametrize('kind, dtype, peak', [
    ('NVIDIA H200', 'bfloat16', 989.0),
    ('NVIDIA H100 80GB HBM3', np.dtype('float32'), 494.5),
    ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
    ('TPU v4', 'float32', None),
    ('cpu', 'bfloat16', None),
])
def test_peak_tflops(kind, dtype, peak):
  assert flops.peak_tflops(kind, dtype) == peak


def test_mfu():
  """ViT-B/16 at 3000 img/s training on an H200 in bf16: 3000 * 105.6 GFLOP / 989 TFLOP/s."""
  assert flops.mfu('vit_b16', 224, 3000.0, 'NVIDIA H200', 'bfloat16') == pytest.approx(
      3000 * 3 * 35.2 / 989e3)
  assert flops.mfu('resnet18', 224, 1000.0, 'NVIDIA H200', 'bfloat16', training=False) == \
      pytest.approx(1000 * 3.63 / 989e3)
  assert flops.mfu('resnet18', 224, 1000.0, 'cpu', 'float32') is None
  assert flops.mfu('alexnet', 224, 1000.0, 'NVIDIA H200', 'bfloat16') is None


def test_dtype_names():
  ml_dtypes = pytest.importorskip('ml_dtypes')
  assert flops.dtype_name(ml_dtypes.bfloat16) == 'bfloat16'
  assert flops.dtype_name(np.float32) == 'float32'
  assert flops.dtype_name('torch.bfloat16') == 'bfloat16'


def test_imports_no_framework():
  """Importable where only the standard library is: no jax, torch or tensorflow."""
  code = ('import sys; import flowers_jax.flops; '
          'print(sorted({"jax", "torch", "tensorflow"} & set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'
