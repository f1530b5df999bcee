r"""EfficientNet-B0 on Flowers102: the study's baselines and SE -> ECA attention.

  python -m flowers_jax.main --config configs/efficientnet_b0.py:eca --workdir runs/effnet_eca \
      --config.data.dir=~/flowers102 \
      --config.init.torchvision=efficientnet_b0_rwightman-7f5810bc.pth

Variants:
  frozen       backbone frozen, only `classifier` trains (baseline 1)
  finetune     everything trains (baseline 2)
  eca          every SE block replaced by ECA (study); the rest loads from torchvision
  eca_spatial  ECA followed by a CBAM-style spatial gate (the study's proposed next step)
  strong       a published transfer recipe, aiming to beat every number of the study

Recipes. The study says only: torchvision ImageNet weights, 224 px, frozen = only the last layer
trains, ECA replaces every SE block. Everything else of the study variants is our choice, the same
for all of them: SGD momentum 0.9, lr 0.01 (frozen: 0.05, only the head trains), weight decay
1e-4 (not on biases / BN), cosine decay, no warmup, 20 epochs, batch 32, RandomResizedCrop + flip
at 224 px, eval resize 256 + center crop 224 (bicubic, torchvision's IMAGENET1K_V1 preset),
torchvision's dropout 0.2 and stochastic depth 0.2. BatchNorm (`train.batchnorm`): batch
statistics with running ones updated, frozen included (torch's `model.train()` recipe).

strong: BiT-HyperRule (Kolesnikov et al. 2020, "Big Transfer", arXiv:1912.11370, section 3.3 and
google-research/big_transfer bit_hyperrule.py: < 20k examples -> 500 steps, warmup 100, lr / 10 at
steps 200, 300, 400; batch 512; SGD momentum 0.9, lr 0.003; no weight decay; inception crop + flip)
with big_vision's Flowers transfer settings (big_vision/configs/transfer.py: grad clip 1.0, wd
None). `train.steps=500` of batch 512 (~251 passes over 1020 images), validation every 100 steps
(big_vision's `log_steps=100`), the head zero-initialised (BiT, big_vision); bfloat16 compute.
Resolution: 224, not BiT's larger 480 crop: EfficientNet-B0's activations at batch 512 take ~80 GB
at 224 px but ~180 GB at 384 px (XLA's buffer sizes of the bfloat16 train step, measured on CPU; a
GPU usually needs less). On a GPU with less memory, keep the
batch and set `--config.train.accum_steps=2` (or 4): the same update in microbatches (BatchNorm
normalises each microbatch, as torch's accumulation does).
"""

from flowers_jax.config import base_config, select_variant

VARIANTS = {
    # BatchNorm 'batch': the torch recipe the study's PyTorch code implies (backbone
    # requires_grad=False, model.train() while training: batch statistics, running ones
    # updated). --config.train.batchnorm=running gives a strict linear probe instead.
    'frozen': {'train.freeze': 'backbone', 'train.batchnorm': 'batch', 'optim.lr': 0.05},
    'finetune': {},
    'eca': {'model.attention': 'eca'},
    'eca_spatial': {'model.attention': 'eca_spatial'},
    'strong': {'train.batch_size': 512, 'train.eval_batch_size': 256, 'train.steps': 500,
               'evals.every_steps': 100, 'init.zero_head': True,
               'train.dtype': 'bfloat16', 'optim.name': 'sgd', 'optim.momentum': 0.9,
               'optim.lr': 0.003, 'optim.weight_decay': 0.0, 'optim.schedule': 'step',
               'optim.step_boundaries': (0.4, 0.6, 0.8), 'optim.step_factor': 0.1,
               'optim.warmup_steps': 100, 'optim.clip_norm': 1.0},
}


def get_config(arg=None):
  c = base_config()
  c.model.name = 'efficientnet_b0'
  c.model.attention = 'se'
  c.model.dropout = 0.2
  c.model.stochastic_depth = 0.2
  c.data.interpolation = 'bicubic'
  c.optim.lr = 0.01
  return select_variant(c, arg, VARIANTS)
