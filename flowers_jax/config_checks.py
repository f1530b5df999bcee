"""Checks a run's config before anything is built: a bad value is one line naming the key.

    config_checks.validate(config)   # ConfigError: "train.label_smoothing=2.0: expected ..."

Keys: every key must be one of `config.BASE` (a config file or `--config.x=` that adds
another is an error); `config.model` may also hold the options of its model
(`models.spec(name).options`). The `data` section's keys and values (source, preprocessing,
interpolation) are checked by `data.DataConfig.parse` with the data registries.

Values: one table, `RULES`: a dotted key, a predicate and what is valid. A rule whose key the
config does not have is skipped (small configs in tests). Choices come from the registries that
use them (`losses.LOSSES`, `optim.OPTIMIZERS`, ...), so a new loss or optimizer is valid here the
moment it is registered.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

from flowers_jax import config_utils, evaluators, losses, models, optim, parallel
from flowers_jax.config import BASE, ConfigError

BATCHNORM_MODES = ('auto', 'batch', 'running')
DTYPES = ('float32', 'bfloat16')
TEST_CHECKPOINTS = ('best', 'final')


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(n: int) -> Callable[[Any, Any], bool]:
  return lambda v, c: _is_int(v) and v >= n


def _number_in(lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False):
  def ok(v, c):
    if not _is_number(v):
      return False
    above = v > lo if lo_open else v >= lo
    below = v < hi if hi_open else v <= hi
    return above and below
  return ok


def _one_of(choices) -> Callable[[Any, Any], bool]:
  return lambda v, c: isinstance(v, str) and v in choices


def _freeze_ok(v: Any, c: Any) -> bool:
  """'none', 'backbone', or comma-separated regexes that compile (matching is checked later)."""
  if isinstance(v, (list, tuple)):
    v = ','.join(map(str, v))
  if not isinstance(v, str) or not v.strip():
    return False
  if v.strip() in ('none', 'backbone'):
    return True
  try:
    for r in v.split(','):
      if r.strip():
        re.compile(r.strip())
  except re.error:
    return False
  return any(r.strip() for r in v.split(','))


def _parses(parse: Callable[[Any], Any]) -> Callable[[Any, Any], bool]:
  """Valid when `parse(value)` raises no ValueError (the parser that will read it later)."""
  def ok(v, c):
    try:
      parse(v)
    except (ValueError, TypeError):
      return False
    return True
  return ok


def _increasing_fractions(v: Any, c: Any) -> bool:
  """A tuple of numbers strictly inside (0, 1), strictly increasing (may be empty)."""
  if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
    return False
  return all(0 < x < 1 for x in v) and all(a < b for a, b in zip(v, v[1:]))


def _process_id_ok(v: Any, c: Any) -> bool:
  n = _lookup(c, 'distributed.num_processes')[1]
  return _is_int(v) and 0 <= v < (n if _is_int(n) and n >= 1 else 1)


def _accum_ok(v: Any, c: Any) -> bool:
  """Divides the global batch; one step's batch for the batch-hard loss (it mines it whole)."""
  batch = _lookup(c, 'train.batch_size')[1]
  loss = _lookup(c, 'train.loss')[1]
  return (_is_int(v) and v >= 1 and (not _is_int(batch) or batch % v == 0)
          and (v == 1 or loss != 'tcel_hard'))


def _mix_ok(v: Any, c: Any) -> bool:
  """An alpha >= 0; mixing (> 0) trains on soft targets: the 'ce' loss only."""
  return _number_in(0, math.inf, hi_open=True)(v, c) and (
      v == 0 or _lookup(c, 'train.loss')[1] in (None, 'ce'))


def _is_bool(v: Any, c: Any) -> bool:
  return isinstance(v, bool)


def _existing_path_or_empty(v: Any, c: Any) -> bool:
  return isinstance(v, str) and (not v or os.path.exists(os.path.expanduser(v)))


@dataclasses.dataclass(frozen=True)
class Rule:
  key: str                              # dotted config key
  ok: Callable[[Any, Any], bool]        # (value, whole config) -> valid?
  valid: str                            # what is valid, for the message


RULES: tuple[Rule, ...] = (
    Rule('seed', lambda v, c: _is_int(v), 'an integer'),
    Rule('parallel', _one_of(parallel.STRATEGIES), ' | '.join(parallel.STRATEGIES)),
    Rule('model.name', _one_of(models.names()), ' | '.join(models.names())),
    Rule('model.num_classes', _int_at_least(2), 'an integer >= 2'),
    Rule('init.torchvision', _existing_path_or_empty,
         "'' (random init) or an existing .pth file / converted-weights directory"),
    Rule('init.weights', lambda v, c: isinstance(v, str) and not (v and c.init.torchvision),
         "a weights spec ('torchvision:PATH', 'timm:DIR', 'timm:NAME', 'timm:FILE' or a path),"
         " or '' (random init); not together with init.torchvision (its shorthand)"),
    Rule('init.allow_partial', _is_bool, 'True or False'),
    Rule('init.zero_head', _is_bool, 'True or False'),
    Rule('model.remat', _is_bool, 'True or False'),
    Rule('data.image_size', _int_at_least(16), 'an integer >= 16 (pixels)'),
    Rule('data.eval_resize', _int_at_least(0), "0 (image_size * 256 / 224) or >= image_size"),
    Rule('data.threads', _int_at_least(0), 'an integer >= 0 (0: tf.data AUTOTUNE)'),
    Rule('data.prefetch', _int_at_least(0), 'an integer >= 0'),
    Rule('train.epochs', _int_at_least(1), 'an integer >= 1'),
    Rule('train.steps', _int_at_least(0), 'an integer >= 0 (0: train.epochs decides)'),
    Rule('train.checkpoint_every_steps', _int_at_least(0),
         'an integer >= 0 (0: latest with every validation)'),
    Rule('train.test_checkpoint', _one_of(TEST_CHECKPOINTS),
         'best (the best validation accuracy) | final (the last step)'),
    Rule('train.accum_steps', _accum_ok,
         'an integer >= 1 that divides train.batch_size (and 1 for train.loss=tcel_hard, '
         'which mines the whole batch)'),
    Rule('train.ema_decay', _number_in(0, 1, hi_open=True), 'a number in [0, 1) (0: off)'),
    Rule('train.mixup', _mix_ok, 'a number >= 0 (0: off); > 0 needs train.loss=ce'),
    Rule('train.cutmix', _mix_ok, 'a number >= 0 (0: off); > 0 needs train.loss=ce'),
    Rule('train.mix_switch_prob', _number_in(0, 1), 'a number in [0, 1]'),
    Rule('train.batch_size', _int_at_least(1), 'an integer >= 1 (global batch)'),
    Rule('train.eval_batch_size', _int_at_least(1), 'an integer >= 1 (global batch)'),
    Rule('train.freeze', _freeze_ok,
         "'none', 'backbone', or comma-separated regexes on parameter paths"),
    Rule('train.batchnorm', _one_of(BATCHNORM_MODES),
         'auto (running if train.freeze=backbone, else batch) | batch | running'),
    Rule('train.loss', _one_of(losses.LOSSES), ' | '.join(losses.LOSSES)),
    Rule('train.label_smoothing', _number_in(0, 1, hi_open=True), 'a number in [0, 1)'),
    Rule('train.triplet_margin', _number_in(0, math.inf, hi_open=True), 'a number >= 0'),
    Rule('train.triplet_weight', _number_in(0, math.inf, hi_open=True), 'a number >= 0'),
    Rule('train.pk_k', _int_at_least(2), 'an integer >= 2 (images per class)'),
    Rule('train.dtype', _one_of(DTYPES), ' | '.join(DTYPES)),
    Rule('train.log_every', _int_at_least(1), 'an integer >= 1 (steps)'),
    Rule('train.max_steps_per_epoch', _int_at_least(0), 'an integer >= 0 (0: full epochs)'),
    Rule('optim.name', _one_of(optim.OPTIMIZERS), ' | '.join(optim.OPTIMIZERS)),
    Rule('optim.lr', _number_in(0, math.inf, lo_open=True, hi_open=True), 'a number > 0'),
    Rule('optim.momentum', _number_in(0, 1, hi_open=True), 'a number in [0, 1)'),
    Rule('optim.b1', _number_in(0, 1, hi_open=True), 'a number in [0, 1)'),
    Rule('optim.b2', _number_in(0, 1, hi_open=True), 'a number in [0, 1)'),
    Rule('optim.eps', _number_in(0, math.inf, lo_open=True, hi_open=True), 'a number > 0'),
    Rule('optim.weight_decay', _number_in(0, math.inf, hi_open=True), 'a number >= 0'),
    Rule('optim.schedule', _one_of(optim.SCHEDULES), ' | '.join(optim.SCHEDULES)),
    Rule('optim.warmup_steps', _int_at_least(0), 'an integer >= 0 (steps)'),
    Rule('optim.step_factor', _number_in(0, math.inf, lo_open=True, hi_open=True),
         'a number > 0'),
    Rule('optim.clip_norm', _number_in(0, math.inf, hi_open=True), 'a number >= 0 (0: off)'),
    Rule('optim.step_boundaries', _increasing_fractions,
         'increasing fractions of the run strictly between 0 and 1, e.g. (0.5, 0.75)'),
    Rule('evals.names', _parses(evaluators.parse_names),
         f'comma-separated evaluators including classification, of: '
         f'{", ".join(evaluators.EVALUATORS)}'),
    Rule('evals.knn_k', _int_at_least(1), 'an integer >= 1 (neighbours)'),
    Rule('evals.every_steps', _int_at_least(0),
         'an integer >= 0 (steps; 0: after every epoch)'),
    Rule('optim.layer_decay', _number_in(0, 1, lo_open=True), 'a number in (0, 1] (1: off)'),
    Rule('optim.lr_mults', _parses(optim.parse_lr_mults),
         "'' or 'regex=mult,regex=mult' (mult a number > 0; the first match wins)"),
    Rule('distributed.num_processes', _int_at_least(1), 'an integer >= 1'),
    Rule('distributed.process_id', _process_id_ok,
         'an integer in [0, distributed.num_processes)'),
    Rule('distributed.heartbeat_timeout_s', _int_at_least(1), 'an integer >= 1 (seconds)'),
)


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return False, None
    node = node[part]
  return True, node


# Sections that may hold keys BASE lacks: section -> (the section -> those keys).
EXTRA_KEYS: dict[str, Callable[[Any], tuple[str, ...]]] = {
    'model': lambda m: tuple(models.spec(m.name).options) if 'name' in m else (),
}
CHECKED_ELSEWHERE = ('data',)  # data.DataConfig.parse checks this section's keys


def check_keys(config: Any, base: dict = BASE, where: str = '') -> None:
  """Raises `ConfigError` for the first key of `config` that `base` (and `EXTRA_KEYS`) lack."""
  valid = tuple(base) + (EXTRA_KEYS[where](config) if where in EXTRA_KEYS else ())
  for key in config.keys():
    dotted = f'{where}.{key}' if where else key
    if key not in valid:
      raise config_utils.unknown_key(dotted, key, valid, where)
    if isinstance(base.get(key), dict) and dotted not in CHECKED_ELSEWHERE:
      check_keys(config[key], base[key], dotted)


def validate(config: Any) -> None:
  """Raises `ConfigError` (one line) for the first unknown key or the first value of `config`
  that `RULES` reject."""
  for rule in RULES:
    present, value = _lookup(config, rule.key)
    if present and not rule.ok(value, config):
      raise ConfigError(f'--config.{rule.key}={value!r} is not valid; expected {rule.valid}')
  check_keys(config)
