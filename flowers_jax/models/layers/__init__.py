"""Layers shared by the models: attention gates (EfficientNet), deformable convolution (ResNet),
torch-numerics BatchNorm, batch-global dropout, conv lowerings and torch's initialisers."""
