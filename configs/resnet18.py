r"""ResNet18 on Flowers102: the study's two baselines and its deformable-convolution variants.

  python -m flowers_jax.main --config configs/resnet18.py:finetune \
      --workdir runs/resnet18_finetune \
      --config.data.dir=~/flowers102 --config.init.torchvision=resnet18-f37072fd.pth

Variants:
  frozen                 backbone frozen (BN in inference mode), only `fc` trains (baseline 1)
  finetune               everything trains (baseline 2)
  deform_after_conv1     input -> conv1 -> deformable 3x3 -> bn1 -> ... (study, random init)
  deform_parallel_conv1  conv1(x) + deformable 7x7/2 (x) -> bn1 -> ... (study, random init)
  deform_every_stage     a deformable 3x3 after each of layer1..layer4 (study: collapsed to 10-30%)
  <deform variant>_pretrained_init   the study's proposed fix: deformable layers start as the
                         identity / as half of the pretrained conv1, so step 0 equals ResNet18
  strong                 a published transfer recipe, aiming to beat every number of the study

Args (`ARGS`), alone or after a variant: `deform=none|after_conv1|parallel_conv1|every_stage`,
`init=random|pretrained` (the deformable layers' init). `:deform=parallel_conv1,init=pretrained`
gives the config of `:deform_parallel_conv1_pretrained_init` (`config.variant` reads
`finetune_deform-parallel_conv1_init-pretrained`).

Recipes. The study says only: torchvision ImageNet weights, 224 px, frozen = only the last layer
trains, deformable layers randomly initialised (torchvision.ops.deform_conv2d). Everything else
of the study variants is our choice, the same for all of them: SGD momentum 0.9, lr 0.01 (frozen:
0.05, only the head trains), weight decay 1e-4 (not on biases / BN), cosine decay, no warmup, 20
epochs, batch 32, RandomResizedCrop + flip at 224 px, eval resize 256 + center crop 224 (bilinear,
torchvision's IMAGENET1K_V1 preset). BatchNorm (`train.batchnorm`): every variant, frozen
included, trains on batch statistics and updates the running ones, as torch's `model.train()`
does (for frozen: the usual `requires_grad=False` recipe; `running` gives a strict linear probe).

strong: BiT-HyperRule (Kolesnikov et al. 2020, "Big Transfer", arXiv:1912.11370, section 3.3 and
google-research/big_transfer bit_hyperrule.py: < 20k examples -> 500 steps, warmup 100, lr / 10 at
steps 200, 300, 400; batch 512; SGD momentum 0.9, lr 0.003; no weight decay; inception crop + flip;
larger resolution for images of >= 96x96 px: resize 512, crop 480) with big_vision's Flowers
transfer settings (big_vision/configs/transfer.py: grad clip 1.0, wd None). Here: 384 px (eval:
resize 439, center crop 384; at batch 512, 448 px needs ~75 GB for activations, 384 px ~55 GB: XLA's
buffer sizes of the bfloat16 train step, measured on CPU; a GPU usually needs less),
`train.steps=500` of batch 512 (~251 passes over 1020 images, one stream: nothing dropped),
validation every 100 steps (big_vision's `log_steps=100`), the head zero-initialised (BiT's and
big_vision's `head_zeroinit`); step schedule at 0.4 / 0.6 / 0.8 of the run; bfloat16 compute.
On a GPU with less memory, keep the batch and set
`--config.train.accum_steps=2` (or 4): the same update in microbatches (BatchNorm normalises each
microbatch, as torch's accumulation does).
"""

from flowers_jax.config import base_config, select_variant

DEFORM = ('after_conv1', 'parallel_conv1', 'every_stage')
ARGS = {
    'deform': {d: {'model.deform': d} for d in ('none',) + DEFORM},
    'init': {i: {'model.deform_init': i} for i in ('random', 'pretrained')},
}
VARIANTS = {
    # BatchNorm 'batch': the torch recipe the study's PyTorch code implies (backbone
    # requires_grad=False, model.train() while training: batch statistics, running ones
    # updated). --config.train.batchnorm=running gives a strict linear probe instead.
    'frozen': {'train.freeze': 'backbone', 'train.batchnorm': 'batch', 'optim.lr': 0.05},
    'finetune': {},
    **{f'deform_{d}': ARGS['deform'][d] for d in DEFORM},
    **{f'deform_{d}_pretrained_init': {**ARGS['deform'][d], **ARGS['init']['pretrained']}
       for d in DEFORM},
    'strong': {'data.image_size': 384, 'train.batch_size': 512, 'train.eval_batch_size': 256,
               'train.steps': 500, 'evals.every_steps': 100, 'init.zero_head': True,
               'train.dtype': 'bfloat16', 'optim.name': 'sgd',
               'optim.momentum': 0.9, 'optim.lr': 0.003, 'optim.weight_decay': 0.0,
               'optim.schedule': 'step', 'optim.step_boundaries': (0.4, 0.6, 0.8),
               'optim.step_factor': 0.1, 'optim.warmup_steps': 100, 'optim.clip_norm': 1.0},
}


def get_config(arg=None):
  c = base_config()
  c.model.name = 'resnet18'
  c.model.deform = 'none'
  c.model.deform_init = 'random'
  c.optim.lr = 0.01
  return select_variant(c, arg, VARIANTS, **ARGS)
