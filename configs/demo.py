r"""A CPU-sized demo: ResNet18 from random init on a synthetic Flowers102-format set.

`make demo` writes the data set with scripts/make_fake_flowers.py and runs

  python -m flowers_jax.main --config configs/demo.py --workdir runs/demo \
      --config.data.dir=runs/demo_data

Variants: `default` only (the `:arg` is optional).

32 px keeps the demo at about a minute on 2 cores. (At 33-64 px ResNet18's last stage runs on
2x2 maps, where XLA's CPU backend once took a 20x slower path for the 3x3 convs; since
`models/layers/conv.py` lowers them as im2col + one dot, 64 px costs only its 4x pixels.)
"""

from flowers_jax.config import base_config, select_variant

VARIANTS = {'default': {}}


def get_config(arg=None):
  c = base_config()
  c.model.name = 'resnet18'
  c.model.num_classes = 10
  c.model.deform = 'none'
  c.model.deform_init = 'random'
  c.data.dir = 'runs/demo_data'
  c.data.image_size = 32
  c.train.epochs = 8
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.log_every = 5
  c.optim.name = 'adamw'
  c.optim.lr = 2e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 10
  return select_variant(c, arg, VARIANTS, default='default')
