r"""ViT-B/16 on Flowers102: the study's baselines and cross-entropy + triplet loss (TCEL).

  python -m flowers_jax.main --config configs/vit_b16.py:tcel --workdir runs/vit_tcel \
      --config.data.dir=~/flowers102 --config.init.torchvision=vit_b_16-c867db91.pth

Variants:
  frozen     backbone frozen, only `heads` trains (baseline 1)
  finetune   everything trains with cross-entropy (baseline 2)
  triplet    triplet loss alone on random triplets (the study's first try, ~3% val accuracy)
  tcel       cross-entropy + triplet loss on random triplets (study)
  tcel_hard  cross-entropy + batch-hard triplet loss on P x K batches (the study's proposed fix)
"""

from configs import common

VARIANTS = {
    'frozen': {'train.freeze': 'backbone', 'optim.lr': 0.03},
    'finetune': {},
    'triplet': {'train.loss': 'triplet'},
    'tcel': {'train.loss': 'tcel'},
    'tcel_hard': {'train.loss': 'tcel_hard'},
}


def get_config(arg=None):
  c = common.get_config()
  c.model.name = 'vit_b16'
  # Follows data.image_size (a linked field): a 224 checkpoint's position embedding is resized
  # (bicubic) when loaded into a model of another size.
  c.model.image_size = c.data.get_ref('image_size')
  c.data.interpolation = 'bicubic'
  c.optim.lr = 0.003
  c.optim.warmup_steps = 100
  c.optim.clip_norm = 1.0
  return common.select_variant(c, arg, VARIANTS)
