"""Torch models for parity tests: every parameter perturbed and BatchNorm running statistics
random, so that a converter which drops or swaps any of them is caught."""

import torch


def perturbed(build, seed: int = 0):
  """`build()` (a torch module, built after `torch.manual_seed(seed)`), parameters +
  N(0, 0.05^2), BatchNorm running means N(0, 0.1^2) and variances U(0.5, 1.5); eval mode."""
  torch.manual_seed(seed)
  model = build()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return model.eval()
