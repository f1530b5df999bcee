r"""ViT-B/16 on Flowers102: the study's baselines and cross-entropy + triplet loss (TCEL).

  python -m flowers_jax.main --config configs/vit_b16.py:tcel --workdir runs/vit_tcel \
      --config.data.dir=~/flowers102 --config.init.torchvision=vit_b_16-c867db91.pth

Variants:
  frozen     backbone frozen, only `heads` trains (baseline 1)
  finetune   everything trains with cross-entropy (baseline 2)
  triplet    triplet loss alone on random triplets (the study's first try, ~3% val accuracy)
  tcel       cross-entropy + triplet loss on random triplets (study)
  tcel_hard  cross-entropy + batch-hard triplet loss on P x K batches (the study's proposed fix)
  strong     a published transfer recipe, aiming to beat every number of the study

Recipes. The study says only: torchvision's pretrained vit_b_16, 224 px, frozen = only the last
layer trains, TCEL = cross-entropy + triplet loss on random (anchor, positive, negative) triplets.
Everything else of the study variants is our choice, the same for all of them: SGD momentum 0.9,
lr 0.003 (frozen: 0.03, only the head trains), linear warmup over 100 steps, cosine decay, grad
clip 1.0, weight decay 1e-4 (not on biases / LayerNorm), 20 epochs, batch 32, RandomResizedCrop +
flip at 224 px, eval resize 256 + center crop 224 (bilinear, torchvision's IMAGENET1K_V1 preset),
triplet margin 1.0 and weight 1.0 (torch's TripletMarginLoss defaults). No BatchNorm.

strong: big_vision's Flowers transfer (big_vision/configs/transfer.py, dataset oxford_flowers102:
SGD momentum 0.9 ("momentum_hp"), lr 0.003, batch 512, 500 steps, 100 warmup steps then cosine
decay, grad clip 1.0, no weight decay, inception crop + flip, head re-initialised to zeros; its
ViT-B/32 reaches 99.4% test), with label smoothing 0.1 (Szegedy et al. 2016; the DeiT / torchvision
ViT recipes use it) and layer-wise lr decay 0.75 (BEiT, Bao et al. 2021, and MAE's fine-tuning
recipe, He et al. 2021: block i's lr x 0.75^(12 - i)). `train.steps=500` of batch 512, validation
every 100 steps (big_vision's `log_steps=100`);
bfloat16 compute; 224 px, the resolution of the IN-1k weights (big_vision transfers at 384:
`--config.data.image_size=384` resizes the position embedding, but takes ~3x the compute and ~4x the
activation memory: 103 GiB at 224 px, 389 GiB at 384 px for batch 512, XLA's buffer sizes of the
bfloat16 train step measured on CPU; with `train.accum_steps=8` 14 and 50 GiB; docs/benchmarks.md
"Memory" has them, and `model.remat`'s). On a GPU with less memory, keep the batch and set
`--config.train.accum_steps=N`: the same update as the whole batch (no BatchNorm here).
"""

from flowers_jax.config import base_config, select_variant

VARIANTS = {
    'frozen': {'train.freeze': 'backbone', 'optim.lr': 0.03},
    'finetune': {},
    'triplet': {'train.loss': 'triplet'},
    'tcel': {'train.loss': 'tcel'},
    'tcel_hard': {'train.loss': 'tcel_hard'},
    'strong': {'train.batch_size': 512, 'train.eval_batch_size': 256, 'train.steps': 500,
               'evals.every_steps': 100, 'init.zero_head': True,
               'train.dtype': 'bfloat16', 'train.label_smoothing': 0.1,
               'optim.layer_decay': 0.75, 'optim.name': 'sgd',
               'optim.momentum': 0.9, 'optim.lr': 0.003, 'optim.weight_decay': 0.0,
               'optim.schedule': 'cosine', 'optim.warmup_steps': 100, 'optim.clip_norm': 1.0},
}


def get_config(arg=None):
  c = base_config()
  c.model.name = 'vit_b16'
  # Follows data.image_size (a linked field): a 224 checkpoint's position embedding is resized
  # (bicubic) when loaded into a model of another size.
  c.model.image_size = c.data.get_ref('image_size')
  # data.interpolation, mean, std are left to the weights: torchvision's vit_b_16
  # (IMAGENET1K_V1: bilinear, ImageNet mean / std, the defaults) or a timm checkpoint's own
  # pretrained_cfg (the augreg ViTs: bicubic, mean = std = 0.5, crop 0.9).
  c.optim.lr = 0.003
  c.optim.warmup_steps = 100
  c.optim.clip_norm = 1.0
  # Every variant also measures its embedding (k-NN, recall@K against the train split), so
  # the triplet variants' "better feature representations" can be compared with CE's.
  c.evals.names = 'classification,embedding'
  return select_variant(c, arg, VARIANTS)
