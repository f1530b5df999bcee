"""The base config every experiment starts from, and the `:arg` of a config file.

`BASE` holds every key with its default as plain data (importable without ml_collections:
scripts/benchmarks builds its namespaces from it); `base_config()` wraps it in a ConfigDict.
`configs/<model>.py` files build on `base_config()`: they set their model's keys and apply the
`:arg` of `--config configs/<model>.py:<arg>` with `select_variant`. The config owns every
default: code reads `config.a.b` and never supplies its own fallback, so `--config.a.b=value`
is the one knob. The keys other tools rely on are listed in docs/architecture.md.

An `:arg` is a named variant, `name=value` args, or both (big_vision's `parse_arg` style):

    configs/resnet18.py:frozen
    configs/resnet18.py:deform=parallel_conv1,init=pretrained
    configs/resnet18.py:frozen,deform=after_conv1

To add a variant, add `'name': {'dotted.key': value, ...}` to the config file's `VARIANTS`
(keys must exist in `BASE` or be set by that file's `get_config`); to add an arg, add
`name={value: {'dotted.key': value}}` to its `select_variant(...)` call.
"""

from __future__ import annotations

from typing import Any, Mapping

BASE: dict[str, Any] = {
    'seed': 0,
    # 'sharded' (jit over a Mesh: maintained, and as fast or faster, docs/architecture.md)
    # | 'pmap' (jax.pmap, in maintenance mode since jax 0.8; supported and tested).
    'parallel': 'sharded',
    # The config file's variant and args (`select_variant`); names the run (scripts/report.py).
    'variant': '',
    'model': {
        'name': 'resnet18',
        'num_classes': 102,
        # Every other key is a model option (`models.spec(name).options`), set by the model's
        # config file, e.g. ResNet's 'deform', ViT's 'image_size'.
        # Activation checkpointing (jax.checkpoint): per encoder block (ViT), per stage (ResNet,
        # EfficientNet). Less memory, one more forward pass per step.
        'remat': False,
    },
    'init': {
        # Pretrained weights (convert.load_weights): 'torchvision:PATH' (.pth state_dict or
        # converted checkpoint dir), 'timm:DIR' (Hugging Face layout: model.safetensors +
        # timm's config.json), 'timm:NAME' (the local Hugging Face cache), 'timm:FILE'
        # (.safetensors / .pth), or a bare path of a recognised format; '' = random init.
        'weights': '',
        'torchvision': '',  # shorthand of weights='torchvision:PATH'
        'allow_partial': False,  # True: load a state_dict that covers only part of the backbone
        'zero_head': False,  # True: the classifier head starts at zero (big_vision's transfer)
    },
    'data': {
        'source': 'folder',  # 'tfds' | 'folder' | 'imagefolder'
        'dir': '',
        'image_size': 224,
        # Preprocessing (flowers_jax/data/pp.py): a preset name or a '|'-separated string of
        # ops, e.g. 'random_resized_crop|flip_lr'. Presets: pp_train 'rrc_flip' | 'flip' |
        # 'none', pp_eval 'center_crop' (resize the short side to eval_resize, center crop
        # image_size).
        'pp_train': 'rrc_flip',
        'pp_eval': 'center_crop',
        'eval_resize': 0,  # 0: round(image_size * 256 / 224)
        # '' (and () for mean / std): the weights' preprocessing (timm pretrained_cfg) when
        # init.weights has one, else bilinear and ImageNet's mean / std. config.json records
        # the values used; predict and export follow them.
        'interpolation': '',
        'mean': (),  # per-channel mean of [0, 1] pixels, e.g. (0.485, 0.456, 0.406)
        'std': (),
        'skip_corrupt': False,
        'cache': True,
        'threads': 0,  # 0: tf.data AUTOTUNE
        'prefetch': 2,
        # Where train augmentation runs: 'host' (tf.data; uint8 batches, normalised on the
        # device), 'device' (the split decoded once, held as uint8 on the accelerators and
        # augmented there: data/device_pp.py), 'auto' (device when the split fits
        # DEVICE_CACHE_SHARE of device memory and every train op has a device version).
        'on_device': 'auto',
        'device_cache_size': 0,  # shorter side of the images held on the device; 0: 2 x image_size
    },
    'train': {
        # How long: `steps` optimizer steps, or (steps=0) `epochs` passes of the train split
        # (epochs * (train images // batch_size) steps). The other one is derived and logged.
        'steps': 0,
        'epochs': 20,
        'batch_size': 32,  # global batch, split over hosts and devices
        'eval_batch_size': 64,
        'freeze': 'none',  # 'none' | 'backbone' | comma-separated regexes on param paths
        # BatchNorm during training: 'batch' = batch statistics, running ones updated (torch
        # `model.train()`, also for frozen layers: the usual `requires_grad=False` recipe);
        # 'running' = running statistics, never updated (torch `eval()` for BN: a true linear
        # probe); 'auto' = 'running' when train.freeze='backbone', else 'batch'.
        'batchnorm': 'auto',
        'loss': 'ce',  # 'ce' | 'tcel' | 'triplet' | 'tcel_hard'
        'label_smoothing': 0.0,
        'triplet_margin': 1.0,
        'triplet_weight': 1.0,
        'pk_k': 4,  # images per class in P x K batches (loss 'tcel_hard')
        'dtype': 'float32',  # 'float32' | 'bfloat16' (compute dtype; params stay float32)
        'log_every': 10,  # steps between progress lines
        'max_steps_per_epoch': 0,  # 0: full epochs; >0 truncates (smoke tests)
        'checkpoint': True,
        'checkpoint_every_steps': 0,  # `latest` every N steps; 0: with every validation
        'test_checkpoint': 'best',  # tested state: 'best' (by val accuracy) | 'final'
        # Gradient accumulation: each step's global batch in `accum_steps` microbatches of
        # batch_size / accum_steps (BatchNorm normalises each with its own statistics).
        'accum_steps': 1,
        # EMA of params and BatchNorm statistics (timm ModelEmaV3 with warmup); evaluated and
        # saved beside the raw weights; 0: off.
        'ema_decay': 0.0,
        # Mixup / CutMix (timm's Mixup, batch mode): Beta alphas (0: off), and the probability
        # of CutMix when both are on; mixed on the device inside the train step.
        'mixup': 0.0,
        'cutmix': 0.0,
        'mix_switch_prob': 0.5,
    },
    'optim': {
        'name': 'sgd',  # 'sgd' | 'adamw'
        'lr': 0.01,
        'momentum': 0.9,  # sgd; 0: plain SGD
        'nesterov': False,  # sgd
        'b1': 0.9,  # adamw
        'b2': 0.999,  # adamw
        'eps': 1e-8,  # adamw (torch AdamW's and optax's default)
        'weight_decay': 1e-4,
        'schedule': 'cosine',  # 'constant' | 'step' | 'cosine'
        'warmup_steps': 0,
        'step_boundaries': (0.5, 0.75),  # 'step': fractions of the run
        'step_factor': 0.1,  # 'step': lr multiplier at each boundary
        'clip_norm': 0.0,  # global-norm gradient clipping; 0: off
        'decay_norm_and_bias': False,  # True: weight decay on 1-D params too
        # ViT layer-wise lr decay (BEiT / timm): block i's lr x decay^(depth - i), the
        # embeddings' x decay^(depth + 1), the head's x 1; 1.0: off.
        'layer_decay': 1.0,
        # lr multipliers on parameter paths, 'regex=mult,regex=mult' (the first match wins),
        # e.g. '^head/=10'; '': none. Applied on top of layer_decay.
        'lr_mults': '',
    },
    # Evaluators (flowers_jax/evaluators.py), run on validation each epoch and on test at the
    # best checkpoint: 'classification' (top-1/top-5/loss, per-class accuracy, confusion
    # matrix), 'embedding' (k-NN accuracy and recall@1/5 of the pre-logit embedding against the
    # train split).
    'evals': {
        'names': 'classification',  # comma-separated
        'knn_k': 10,  # 'embedding': neighbours that vote in the k-NN accuracy
        'every_steps': 0,  # validate every N steps (and after the last); 0: after every epoch
    },
    'distributed': {
        'coordinator_address': '',  # 'host:port', or 'auto' (TPU pods, SLURM); '' = one host
        'num_processes': 1,
        'process_id': 0,
        # A process silent this long (crashed, killed) ends the run on every host; jax's default.
        'heartbeat_timeout_s': 100,
    },
}

Overrides = Mapping[str, Any]  # dotted key -> value


class ConfigError(ValueError):
  """A config file, `:arg`, key or value that is not valid; the message is one line."""


def base_config():
  """`BASE` as an `ml_collections.ConfigDict`: every key of every experiment, with its default."""
  import ml_collections
  return ml_collections.ConfigDict(BASE)


def parse_arg(arg: str | None, **choices) -> dict[str, str]:
  """Splits a config file's `:arg` into `{name: value}`, checked against `choices`.

    parse_arg('frozen', variant=V, deform=D)                 -> {'variant': 'frozen'}
    parse_arg('deform=after_conv1,init=pretrained', ...)     -> {'deform': ..., 'init': ...}

  A bare value (no `=`) in first place is the value of the first name of `choices`.

  Args:
    arg: the string after ':' in `--config FILE.py:arg`; None or '' gives {}.
    **choices: arg name -> its valid values (any iterable of strings).

  Returns:
    The given args only.

  Raises:
    ConfigError: an unknown or repeated name, or a value not in its name's choices.
  """
  given: dict[str, str] = {}
  for i, item in enumerate(p.strip() for p in (arg or '').split(',') if p.strip()):
    name, eq, value = item.partition('=')
    if not eq and i == 0:
      name, value = next(iter(choices)), item
    if name not in choices or not eq and i > 0:
      raise ConfigError(f'unknown config arg {item!r} in {arg!r}; valid args: '
                        f'{", ".join(f"{n}=" for n in choices)} (a bare first item is the '
                        f'{next(iter(choices))})')
    if name in given:
      raise ConfigError(f'config arg {name!r} given twice in {arg!r}')
    if value not in choices[name]:
      raise ConfigError(f'unknown {name} {value!r}; valid {name}s: '
                        f'{", ".join(sorted(choices[name]))}')
    given[name] = value
  return given


def override(config, overrides: Overrides, where: str):
  """Sets each `dotted.key: value` of `overrides` on `config`; the keys must exist.

  Raises:
    ConfigError: naming `where` the key came from and the valid keys at that level.
  """
  for dotted, value in overrides.items():
    node = config
    for part in dotted.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none'
        raise ConfigError(f'{where} sets unknown key {dotted!r}; valid keys there: {valid}')
      parent, node = node, node[part]
    parent[part] = value
  return config


def select_variant(config, arg: str | None, variants: Mapping[str, Overrides],
                   default: str = 'finetune', **args: Mapping[str, Overrides]):
  """Applies a config file's `:arg` to `config`: a named variant, then each `name=value` arg.

  Args:
    config: the file's config (a ConfigDict from `base_config()`).
    arg: `'frozen'`, `'deform=parallel_conv1,init=pretrained'`, `'frozen,init=pretrained'`.
    variants: variant name -> overrides (dotted key -> value).
    default: the variant when `arg` names none.
    **args: arg name -> {value: overrides}, applied after the variant in this order.

  Returns:
    `config`, with `config.variant` set to the variant's name, followed by
    `_<name>-<value>` per given arg (a string usable as a directory name).
  """
  tables = {'variant': variants, **args}
  given = parse_arg(arg, **tables)
  name = given.pop('variant', default)
  if name not in variants:
    raise ConfigError(f'unknown variant {name!r}; valid variants: {", ".join(sorted(variants))}')
  override(config, variants[name], f'variant {name!r}')
  chosen = [(key, given[key]) for key in args if key in given]
  for key, value in chosen:
    override(config, args[key][value], f'config arg {key}={value}')
  config.variant = '_'.join([name] + [f'{key}-{value}' for key, value in chosen])
  return config
