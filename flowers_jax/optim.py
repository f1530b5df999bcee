"""Optimizers, learning-rate schedules and freezing masks.

The optimizer is one `optax.GradientTransformation` built from `config.optim`:

    tx = multi_transform({'train': chain(clip?, decay?, sgd | adamw),
                          'frozen': set_to_zero()}, labels)
    tx = chain(tx, scale_by_lr_scales)   # only when some lr multiplier != 1

- Freezing goes through `optax.multi_transform`: frozen leaves get zero updates
  and hold no optimizer state (their slots in `opt_state` are
  `optax.MaskedNode`).
  The inner 'train' transform only ever sees the trainable leaves, so gradient
  clipping computes the global norm on trainable params only.
- Weight decay skips 1-D params (biases, norm scales) unless
  `decay_norm_and_bias`, and the paths of the model's `no_weight_decay`
  regex (ViT's pos_embedding and class_token, as torchvision's recipe).
  SGD adds `wd * p` to the gradient before momentum (torch
  `SGD(weight_decay=...)`); AdamW decays decoupled, scaled by the lr
  (torch `AdamW`).
- Schedules: 'constant' | 'step' | 'cosine', each after a linear warmup from 0
  to `lr` over `warmup_steps` (the caller converts warmup epochs to steps).
  'step' multiplies the lr by `step_factor` at each of `step_boundaries`
  (fractions of `total_steps`); 'cosine' decays to 0 at `total_steps`.

- Per-parameter lr multipliers (`lr_scales`): layer-wise lr decay (`layer_decay`, BEiT /
  timm `param_groups_layer_decay`; the path -> layer id map per model is `LAYER_IDS`) times
  the first matching `lr_mults` entry. They multiply each leaf's final update, after
  momentum / Adam *and* weight decay, i.e. exactly torch param groups with lr * scale
  (torch SGD's decay goes through the lr, AdamW's decoupled `lr * wd * p` too).
- `zero_head` zeroes the classifier for transfer (big_vision's `head_zeroinit`).

Param paths are the '/'-joined dict keys of the params tree, e.g.
'layer1/0/conv1/kernel', 'fc/bias'; freeze regexes use `re.search` on them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
TRAIN, FROZEN = 'train', 'frozen'


def _key_name(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


# ----------------------------------------------------------------------------
# Paths and freezing masks.


def param_paths(params: PyTree) -> PyTree:
  """Same structure as `params`, each leaf replaced by its '/'-joined path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: '/'.join(_key_name(k) for k in path), params)


def _examples(flat: list[str]) -> str:
  return ', '.join(flat[:4] + (['...'] if len(flat) > 4 else []))


def _as_regexes(freeze: str | Sequence[str]) -> list[str]:
  if isinstance(freeze, str):
    return [r.strip() for r in freeze.split(',') if r.strip()]
  return [str(r) for r in freeze]


def trainable_mask(params: PyTree, freeze: Any = 'none',
                   head_pattern: str | None = None) -> PyTree:
  """Pytree of bools, True where the leaf is trained.

  Args:
    params: the params tree.
    freeze: 'none' (or None/''/False): train everything. 'backbone': train only
      leaves whose path matches `head_pattern`. Otherwise a list/tuple of
      regexes, or one comma-separated string of them: freeze every leaf whose
      path matches any of them.
    head_pattern: regex of the head's paths (`models.HEAD_PATTERNS[name]`,
      e.g. '^fc/'); required for 'backbone'.

  Raises:
    ValueError: a regex matches no path, or nothing is left to train.
  """
  paths = param_paths(params)
  flat = jax.tree.leaves(paths)

  def check_matches(regex: str, what: str) -> None:
    if not any(re.search(regex, p) for p in flat):
      raise ValueError(f'{what} {regex!r} matches no parameter path; '
                       f'paths look like: {_examples(flat)}')

  if freeze is None or freeze is False or (
      isinstance(freeze, str) and freeze.strip().lower() in ('', 'none')):
    return jax.tree.map(lambda _: True, paths)
  if isinstance(freeze, str) and freeze.strip().lower() == 'backbone':
    if not head_pattern:
      raise ValueError("freeze='backbone' needs head_pattern (e.g. '^fc/').")
    check_matches(head_pattern, 'head_pattern')
    mask = jax.tree.map(lambda p: bool(re.search(head_pattern, p)), paths)
  else:
    regexes = _as_regexes(freeze)
    if not regexes:
      raise ValueError(f"freeze={freeze!r}: valid values are 'none', "
                       "'backbone', or a list / comma-separated string of "
                       'regexes on param paths.')
    for r in regexes:
      check_matches(r, 'freeze regex')
    mask = jax.tree.map(
        lambda p: not any(re.search(r, p) for r in regexes), paths)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f'freeze={freeze!r} freezes every parameter; nothing '
                     'would be trained.')
  return mask


def describe(params: PyTree, mask: PyTree) -> dict[str, int]:
  """Parameter / tensor counts split by `mask` (True = trainable)."""
  sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.size(x)), params))
  flags = jax.tree.leaves(mask)
  out = {'trainable': 0, 'frozen': 0, 'trainable_tensors': 0,
         'frozen_tensors': 0}
  for n, trained in zip(sizes, flags, strict=True):
    kind = 'trainable' if trained else 'frozen'
    out[kind] += n
    out[kind + '_tensors'] += 1
  out['total'] = out['trainable'] + out['frozen']
  return out


# ----------------------------------------------------------------------------
# Classifier head initialisation.


def zero_head(params: PyTree, head_pattern: str) -> PyTree:
  """`params` with every leaf whose path matches `head_pattern` (kernel and bias) set to 0.

  big_vision's transfer recipe zero-initialises the new head: `head_zeroinit=True` in
  big_vision/configs/transfer.py (the models' `head_zeroinit` option, e.g.
  big_vision/models/vit.py: `nn.Dense(..., kernel_init=nn.initializers.zeros)`), so that
  fine-tuning starts from logits 0, i.e. the uniform prediction.

  Args:
    params: the params tree (`variables['params']`).
    head_pattern: regex on param paths, `models.spec(name).head` (e.g. '^fc/').

  Returns:
    A new tree; the other leaves are the same objects as in `params`.

  Raises:
    ValueError: `head_pattern` matches no parameter path.
  """
  paths = param_paths(params)
  flat = jax.tree.leaves(paths)
  if not any(re.search(head_pattern, p) for p in flat):
    raise ValueError(f'zero_head: head pattern {head_pattern!r} matches no parameter path; '
                     f'paths look like: {_examples(flat)}')
  return jax.tree.map(
      lambda p, x: jnp.zeros_like(x) if re.search(head_pattern, p) else x, paths, params)


# ----------------------------------------------------------------------------
# Per-parameter lr multipliers: layer-wise lr decay and lr_mults.


def _vit_num_layers(paths: Sequence[str]) -> int:
  """Number of encoder blocks of a (torchvision-named) Flax ViT, from its param paths."""
  ids = {int(m.group(1)) for p in paths if (m := re.search(_VIT_BLOCK, p))}
  if not ids or ids != set(range(len(ids))):
    raise ValueError(f'layer_decay: expected ViT blocks encoder/layers/encoder_layer_0..N-1 '
                     f'in the param paths, found block ids {sorted(ids)}; paths look like: '
                     f'{_examples(list(paths))}')
  return len(ids)


_VIT_BLOCK = r'^encoder/layers/encoder_layer_(\d+)/'
_VIT_STEM = r'^(conv_proj/|class_token$|encoder/pos_embedding$)'
_VIT_FINAL_NORM = r'^encoder/ln/'


def _vit_layer_id(path: str, num_layers: int) -> int:
  """timm's `VisionTransformer.group_matcher` on the Flax ViT's paths: 0 for the stem
  (conv_proj, class_token, pos_embedding), i + 1 for block i, num_layers + 1 for the rest
  (heads).

  The final norm `encoder/ln` gets the last block's id, num_layers, as in timm (its matcher
  `(r'^norm', (99999,))` is MATCH_PREV_GROUP: scale layer_decay ** 1). BEiT's and MAE's
  `get_layer_id_for_vit` give it num_layers + 1 (scale 1) instead.
  """
  if re.search(_VIT_STEM, path):
    return 0
  if m := re.search(_VIT_BLOCK, path):
    return int(m.group(1)) + 1
  if re.search(_VIT_FINAL_NORM, path):
    return num_layers
  return num_layers + 1


@dataclasses.dataclass(frozen=True)
class LayerIds:
  """How a model's param paths map to layer ids for layer-wise lr decay.

  `num_layers(paths)` is the number of blocks (read from the params, not a constant);
  `layer_id(path, num_layers)` is in [0, num_layers + 1]: 0 the stem, i + 1 block i,
  num_layers + 1 what follows the blocks.
  """
  num_layers: Callable[[Sequence[str]], int]
  layer_id: Callable[[str, int], int]


_VIT = LayerIds(_vit_num_layers, _vit_layer_id)
# Model name -> its layer ids (a `ModelSpec` field, once models own it).
LAYER_IDS: dict[str, LayerIds] = {'vit_b16': _VIT, 'vit_b32': _VIT, 'vit_l16': _VIT}

_LR_MULTS_FORM = ("'regex=mult,regex=mult' (e.g. '^heads/=10,bias$=2'; mult a positive "
                  'number; the first matching regex wins)')


def parse_lr_mults(spec: str) -> list[tuple[str, float]]:
  """`optim.lr_mults` 'regex=mult,regex=mult' -> [(regex, mult)], in order ('' -> []).

  Spaces around entries, regexes and numbers are stripped; a regex may contain '=' (the
  last '=' splits) but not ','.

  Raises:
    ValueError (one line): an entry without '=', an empty or non-compiling regex, or a
      mult that is not a positive finite number.
  """
  out = []
  for entry in (e.strip() for e in str(spec or '').split(',')):
    if not entry:
      continue
    if '=' not in entry:
      raise ValueError(f"optim.lr_mults entry {entry!r} has no '='; expected {_LR_MULTS_FORM}")
    regex, mult = (t.strip() for t in entry.rsplit('=', 1))
    if not regex:
      raise ValueError(f'optim.lr_mults entry {entry!r} has an empty regex; expected '
                       f'{_LR_MULTS_FORM}')
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f'optim.lr_mults regex {regex!r} does not compile ({e}); expected '
                       f'{_LR_MULTS_FORM}') from None
    try:
      value = float(mult)
    except ValueError:
      value = math.nan
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f'optim.lr_mults entry {entry!r}: multiplier {mult!r} is not a positive '
                       f'finite number; expected {_LR_MULTS_FORM}')
    out.append((regex, value))
  return out


def _layer_decay_scales(flat: list[str], layer_decay: float,
                        model_name: str | None) -> list[float]:
  if not (math.isfinite(layer_decay) and layer_decay > 0):
    raise ValueError(f'optim.layer_decay={layer_decay} must be a positive number (1.0: off)')
  if layer_decay == 1.0:
    return [1.0] * len(flat)
  if model_name not in LAYER_IDS:
    raise ValueError(f'optim.layer_decay={layer_decay} needs layer ids, which only models '
                     f'{sorted(LAYER_IDS)} have (model {model_name!r}); set '
                     'optim.layer_decay=1.0')
  ids = LAYER_IDS[model_name]
  n = ids.num_layers(flat)
  return [layer_decay ** (n + 1 - ids.layer_id(p, n)) for p in flat]


def lr_scales(params: PyTree, optim_cfg: Any, model_name: str | None = None) -> PyTree:
  """Per-leaf lr multipliers (python floats, same structure as `params`).

  scale = layer_decay ** (num_layers + 1 - layer_id) (BEiT / timm
  `param_groups_layer_decay`; layer ids from `LAYER_IDS[model_name]`) times the mult of the
  first `optim_cfg.lr_mults` regex that matches the path (1 if none does).

  Raises:
    ValueError: layer_decay != 1 for a model without `LAYER_IDS`, or a bad `lr_mults`
      (see `parse_lr_mults`; also a regex that matches no parameter path).
  """
  paths = param_paths(params)
  flat = jax.tree.leaves(paths)
  scales = _layer_decay_scales(flat, float(getattr(optim_cfg, 'layer_decay', 1.0)), model_name)
  mults = parse_lr_mults(getattr(optim_cfg, 'lr_mults', ''))
  for regex, _ in mults:
    if not any(re.search(regex, p) for p in flat):
      raise ValueError(f'optim.lr_mults regex {regex!r} matches no parameter path (paths look '
                       f'like: {_examples(flat)}); expected {_LR_MULTS_FORM}')
  for i, p in enumerate(flat):
    scales[i] *= next((m for r, m in mults if re.search(r, p)), 1.0)
  return jax.tree.unflatten(jax.tree.structure(paths), scales)


def describe_lr_scales(scales: PyTree, mask: PyTree | None = None) -> str:
  """One line on the lr multipliers of `lr_scales` (of the trainable leaves if `mask`).

  e.g. 'lr multipliers x0.0317..x1 in 14 groups (76 tensors)'; 'lr multipliers: none (all x1)'.
  """
  values = jax.tree.leaves(scales)
  if mask is not None:
    values = [v for v, t in zip(values, jax.tree.leaves(mask), strict=True) if t]
  groups = sorted(set(values))
  if not groups or groups == [1.0]:
    return 'lr multipliers: none (all x1)'
  lo, hi = groups[0], groups[-1]
  return (f'lr multipliers x{lo:.4g}..x{hi:.4g} in {len(groups)} group'
          f'{"s" if len(groups) > 1 else ""} ({len(values)} tensors)')


def scale_by_lr_scales(scales: PyTree) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its `lr_scales` multiplier (stateless).

  Leaves are matched by path, so `scales` may be a dict while updates are a FrozenDict.
  Put it last in the chain: then the lr of a leaf is lr * scale for momentum, Adam and the
  weight decay term alike, as a torch param group with that lr.
  """
  by_path = dict(zip(jax.tree.leaves(param_paths(scales)), jax.tree.leaves(scales),
                     strict=True))

  def update_fn(updates, state, params=None):
    del params

    def scale(path, u):
      s = by_path['/'.join(_key_name(k) for k in path)]
      return u if s == 1.0 else u * jnp.asarray(s, u.dtype)
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


# ----------------------------------------------------------------------------
# Schedules.


def _constant(cfg, lr: float, total_steps: int, warmup: int) -> optax.Schedule:
  del cfg, total_steps, warmup
  return optax.constant_schedule(lr)


def _step(cfg, lr: float, total_steps: int, warmup: int) -> optax.Schedule:
  # Boundaries are fractions of the whole run; the warmup-joined schedule
  # counts from the end of warmup, hence the shift.
  scales: dict[int, float] = {}
  for frac in cfg.step_boundaries:
    b = int(round(float(frac) * total_steps)) - warmup
    scales[b] = scales.get(b, 1.0) * float(cfg.step_factor)
  return optax.piecewise_constant_schedule(lr, scales)


def _cosine(cfg, lr: float, total_steps: int, warmup: int) -> optax.Schedule:
  del cfg
  return optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    'constant': _constant, 'step': _step, 'cosine': _cosine}


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """lr(step) for `optim_cfg.schedule` after `optim_cfg.warmup_steps` warmup."""
  name = optim_cfg.schedule
  if name not in SCHEDULES:
    raise ValueError(f'Unknown schedule {name!r}; valid: {sorted(SCHEDULES)}')
  lr = float(optim_cfg.lr)
  warmup = int(optim_cfg.warmup_steps)
  if total_steps <= 0:
    raise ValueError(f'total_steps must be positive, got {total_steps}.')
  if not 0 <= warmup < total_steps:
    raise ValueError(f'warmup_steps={warmup} must be in [0, total_steps='
                     f'{total_steps}).')
  main = SCHEDULES[name](optim_cfg, lr, total_steps, warmup)
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


# ----------------------------------------------------------------------------
# Optimizers.


def _decay_mask(decay_norm_and_bias: bool,
                no_decay: str = '') -> Callable[[PyTree], PyTree]:
  """Which leaves weight decay applies to: rank > 1 (unless `decay_norm_and_bias`), and
  not a path matching the model's `no_decay` regex (ViT: pos_embedding, class_token)."""
  # A callable, so that it applies to the (masked) tree the inner transform
  # actually sees inside multi_transform.
  def decayed(path: str, x) -> bool:
    if no_decay and re.search(no_decay, path):
      return False
    return decay_norm_and_bias or np.ndim(x) > 1
  return lambda p: jax.tree.map(decayed, param_paths(p), p)


def _sgd(cfg, schedule, wd: float, decay_mask) -> optax.GradientTransformation:
  return optax.chain(
      optax.add_decayed_weights(wd, decay_mask) if wd else optax.identity(),
      optax.sgd(schedule, momentum=float(cfg.momentum) or None, nesterov=bool(cfg.nesterov)))


def _adamw(cfg, schedule, wd: float,
           decay_mask) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                     weight_decay=wd, mask=decay_mask)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'sgd': _sgd, 'adamw': _adamw}


def make_optimizer(optim_cfg: Any, params: PyTree, *, total_steps: int,
                   freeze: Any = 'none',
                   head_pattern: str | None = None,
                   no_decay: str = '',
                   model_name: str | None = None
                   ) -> optax.GradientTransformation:
  """The run's optimizer (see the module docstring).

  Args:
    optim_cfg: `config.optim` (every key of `config.BASE['optim']`; a
      ConfigDict or any object with those attributes).
    params: the params tree (only its structure, paths and ranks are used).
    total_steps: number of optimizer steps in the run (for the schedule).
    freeze, head_pattern: see `trainable_mask`.
    no_decay: regex on param paths exempt from weight decay
      (`models.spec(name).no_weight_decay`).
    model_name: `config.model.name`, for `optim_cfg.layer_decay` != 1 (`LAYER_IDS`).

  When `lr_scales` are all 1 (layer_decay 1, lr_mults ''), the transform (and its state)
  is exactly the one without them; otherwise `scale_by_lr_scales` is chained last.
  """
  name = optim_cfg.name
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}')
  schedule = make_schedule(optim_cfg, total_steps)
  wd = float(optim_cfg.weight_decay)
  decay_mask = _decay_mask(bool(optim_cfg.decay_norm_and_bias), no_decay)
  clip = float(optim_cfg.clip_norm)
  inner = OPTIMIZERS[name](optim_cfg, schedule, wd, decay_mask)
  if clip > 0:
    inner = optax.chain(optax.clip_by_global_norm(clip), inner)
  scales = lr_scales(params, optim_cfg, model_name)
  mask = trainable_mask(params, freeze, head_pattern)
  labels = jax.tree.map(lambda t: TRAIN if t else FROZEN, mask)
  tx = optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, labels)
  if all(s == 1.0 for s in jax.tree.leaves(scales)):
    return tx
  # Last, after the weight decay inside `inner` (frozen leaves' updates are 0 already).
  return optax.chain(tx, scale_by_lr_scales(scales))
