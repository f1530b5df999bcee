r"""EfficientNet-B0 on Flowers102: the study's baselines and SE -> ECA attention.

  python -m flowers_jax.main --config configs/efficientnet_b0.py:eca --workdir runs/effnet_eca \
      --config.data.dir=~/flowers102 --config.init.torchvision=efficientnet_b0_rwightman-7f5810bc.pth

Variants:
  frozen       backbone frozen, only `classifier` trains (baseline 1)
  finetune     everything trains (baseline 2)
  eca          every SE block replaced by ECA (study); the rest loads from torchvision
  eca_spatial  ECA followed by a CBAM-style spatial gate (the study's proposed next step)
"""

from configs import common

VARIANTS = {
    'frozen': {'train.freeze': 'backbone', 'optim.lr': 0.05},
    'finetune': {},
    'eca': {'model.attention': 'eca'},
    'eca_spatial': {'model.attention': 'eca_spatial'},
}


def get_config(arg=None):
  c = common.get_config()
  c.model.name = 'efficientnet_b0'
  c.model.attention = 'se'
  c.model.dropout = 0.2
  c.model.stochastic_depth = 0.2
  c.data.interpolation = 'bicubic'
  c.optim.lr = 0.01
  return common.select_variant(c, arg, VARIANTS)
