"""Loading `configs/<model>.py:<variant>` files and checking `--config.a.b=value` overrides.

ml_collections' own errors for a mistyped key or variant are tracebacks several screens long;
these helpers turn them into one line that names what is valid.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any

import ml_collections


class ConfigError(ValueError):
  pass


def get(cfg: Any, key: str, default: Any) -> Any:
  """`cfg.get(key, default)` for ConfigDicts and dicts, `getattr` for plain namespaces."""
  if hasattr(cfg, 'get'):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def split_config_arg(spec: str) -> tuple[str, str | None]:
  """'configs/resnet18.py:frozen' -> ('configs/resnet18.py', 'frozen')."""
  path, _, arg = spec.partition(':')
  return path, (arg or None)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Imports the config file of `spec` and returns `get_config(arg)`."""
  path, arg = split_config_arg(spec)
  if not os.path.isfile(path):
    here = os.path.dirname(path) or '.'
    known = sorted(f for f in os.listdir(here) if f.endswith('.py') and f != '__init__.py') \
        if os.path.isdir(here) else []
    raise ConfigError(f'config file {path!r} not found' +
                      (f'; files in {here}/: {", ".join(known)}' if known else ''))
  add_config_root_to_path(path)
  spec_ = importlib.util.spec_from_file_location('_flowers_jax_config', path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def add_config_root_to_path(config_path: str) -> None:
  """Lets `configs/x.py` do `from configs import common` from any working directory."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(config_path)))
  if root not in sys.path:
    sys.path.insert(0, root)


def config_spec_from_argv(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_override_keys(config: ml_collections.ConfigDict, argv: list[str]) -> None:
  """Raises ConfigError for the first `--config.a.b=v` whose key `a.b` is not in `config`."""
  for a in argv:
    if not a.startswith('--config.'):
      continue
    dotted = a[len('--config.'):].split('=', 1)[0]
    node, seen = config, []
    for part in dotted.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join(seen) or 'the config'
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, valid, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise ConfigError(f'unknown config key {dotted!r}{hint}; valid keys in {where}: '
                          f'{", ".join(valid)}')
      node = node[part]
      seen.append(part)
