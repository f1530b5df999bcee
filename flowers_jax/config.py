"""The base config every experiment starts from, and the variant helpers.

`configs/<model>.py` files build on `base_config()`: they set their model's keys and pick a
variant from the `:arg` of `--config configs/<model>.py:<arg>` with `select_variant`. The config
owns every default: code reads `config.a.b` and never supplies its own fallback, so
`--config.a.b=value` is the one knob. The keys other tools rely on are listed in
docs/architecture.md.
"""

import ml_collections



def base_config() -> ml_collections.ConfigDict:
  """Every key of every experiment, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.parallel = 'pmap'  # 'pmap' | 'sharded' (jit over a Mesh)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet18'
  c.model.num_classes = 102

  c.init = ml_collections.ConfigDict()
  c.init.torchvision = ''  # .pth state_dict or converted checkpoint dir; '' = random init
  c.init.allow_partial = False  # True: load a state_dict that covers only part of the backbone

  c.data = ml_collections.ConfigDict()
  c.data.source = 'folder'  # 'tfds' | 'folder' | 'imagefolder'
  c.data.dir = ''
  c.data.image_size = 224
  # Preprocessing (flowers_jax/data/pp.py): a preset name or a '|'-separated string of ops,
  # e.g. 'random_resized_crop|flip_lr'. Presets: pp_train 'rrc_flip' | 'flip' | 'none',
  # pp_eval 'center_crop' (resize the short side to eval_resize, center crop image_size).
  c.data.pp_train = 'rrc_flip'
  c.data.pp_eval = 'center_crop'
  c.data.eval_resize = 0  # 0: round(image_size * 256 / 224)
  c.data.interpolation = 'bilinear'
  c.data.skip_corrupt = False
  c.data.cache = True
  c.data.threads = 0  # 0: tf.data AUTOTUNE
  c.data.prefetch = 2

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 20
  c.train.batch_size = 32  # global batch, split over hosts and devices
  c.train.eval_batch_size = 64
  c.train.freeze = 'none'  # 'none' | 'backbone' | comma-separated regexes on param paths
  # BatchNorm during training: 'batch' = batch statistics, running ones updated (torch
  # `model.train()`, also for frozen layers: the usual `requires_grad=False` recipe);
  # 'running' = running statistics, never updated (torch `eval()` for BN: a true linear probe);
  # 'auto' = 'running' when train.freeze='backbone', else 'batch'.
  c.train.batchnorm = 'auto'
  c.train.loss = 'ce'  # 'ce' | 'tcel' | 'triplet' | 'tcel_hard'
  c.train.label_smoothing = 0.0
  c.train.triplet_margin = 1.0
  c.train.triplet_weight = 1.0
  c.train.pk_k = 4  # images per class in P x K batches (loss 'tcel_hard')
  c.train.dtype = 'float32'  # 'float32' | 'bfloat16' (compute dtype; params stay float32)
  c.train.log_every = 10  # steps between progress lines
  c.train.max_steps_per_epoch = 0  # 0: full epochs; >0 truncates (smoke tests)
  c.train.checkpoint = True

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # 'sgd' | 'adamw'
  c.optim.lr = 0.01
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'  # 'constant' | 'step' | 'cosine'
  c.optim.warmup_steps = 0
  c.optim.step_boundaries = (0.5, 0.75)
  c.optim.step_factor = 0.1
  c.optim.clip_norm = 0.0
  c.optim.decay_norm_and_bias = False

  # Evaluators (flowers_jax/evaluators.py), run on validation each epoch and on test at the
  # best checkpoint: 'classification' (top-1/top-5/loss, per-class accuracy, confusion matrix),
  # 'embedding' (k-NN accuracy and recall@1/5 of the pre-logit embedding against the train split).
  c.evals = ml_collections.ConfigDict()
  c.evals.names = 'classification'  # comma-separated
  c.evals.knn_k = 10  # 'embedding': neighbours that vote in the k-NN accuracy

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''  # 'host:port', or 'auto' (TPU pods, SLURM); '' = one host
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  return c


def select_variant(config, arg, variants):
  """Applies `variants[arg]` (a dict of dotted key -> value) to `config`.

  Raises ValueError naming the valid variants when `arg` is unknown.
  """
  arg = arg or 'finetune'
  if arg not in variants:
    raise ValueError(
        f'unknown variant {arg!r}; valid variants: {", ".join(sorted(variants))}')
  for dotted, value in variants[arg].items():
    node = config
    *parents, leaf = dotted.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f'variant {arg!r} sets unknown key {dotted!r}')
    node[leaf] = value
  config.variant = arg
  return config
