r"""ResNet18 on Flowers102: the study's two baselines and its deformable-convolution variants.

  python -m flowers_jax.main --config configs/resnet18.py:finetune --workdir runs/resnet18_finetune \
      --config.data.dir=~/flowers102 --config.init.torchvision=resnet18-f37072fd.pth

Variants:
  frozen                 backbone frozen (BN in inference mode), only `fc` trains (baseline 1)
  finetune               everything trains (baseline 2)
  deform_after_conv1     input -> conv1 -> deformable 3x3 -> bn1 -> ... (study, random init)
  deform_parallel_conv1  conv1(x) + deformable 7x7/2 (x) -> bn1 -> ... (study, random init)
  deform_every_stage     a deformable 3x3 after each of layer1..layer4 (study: collapsed to 10-30%)
  <deform variant>_pretrained_init   the study's proposed fix: deformable layers start as the
                         identity / as half of the pretrained conv1, so step 0 equals ResNet18
"""

from configs import common

DEFORM = ('after_conv1', 'parallel_conv1', 'every_stage')
VARIANTS = {
    'frozen': {'train.freeze': 'backbone', 'optim.lr': 0.05},
    'finetune': {},
    **{f'deform_{d}': {'model.deform': d} for d in DEFORM},
    **{f'deform_{d}_pretrained_init': {'model.deform': d, 'model.deform_init': 'pretrained'}
       for d in DEFORM},
}


def get_config(arg=None):
  c = common.get_config()
  c.model.name = 'resnet18'
  c.model.deform = 'none'
  c.model.deform_init = 'random'
  c.optim.lr = 0.01
  return common.select_variant(c, arg, VARIANTS)
