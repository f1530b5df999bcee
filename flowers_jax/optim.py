"""Optimizers, learning-rate schedules and freezing masks.

The optimizer is one `optax.GradientTransformation` built from `config.optim`:

    tx = multi_transform({'train': chain(clip?, decay?, sgd | adamw),
                          'frozen': set_to_zero()}, labels)

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

Param paths are the '/'-joined dict keys of the params tree, e.g.
'layer1/0/conv1/kernel', 'fc/bias'; freeze regexes use `re.search` on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
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
  examples = ', '.join(flat[:4] + (['...'] if len(flat) > 4 else []))

  def check_matches(regex: str, what: str) -> None:
    if not any(re.search(regex, p) for p in flat):
      raise ValueError(f'{what} {regex!r} matches no parameter path; '
                       f'paths look like: {examples}')

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
                   no_decay: str = ''
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
  mask = trainable_mask(params, freeze, head_pattern)
  labels = jax.tree.map(lambda t: TRAIN if t else FROZEN, mask)
  return optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()},
                               labels)
