"""Layers shared by the models: attention (ViT), deformable convolution (ResNet)."""
