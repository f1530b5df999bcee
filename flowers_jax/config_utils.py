"""Loading `configs/<model>.py:<arg>` files and checking `--config.a.b=value` overrides.

ml_collections' own errors for a mistyped key or variant are tracebacks several screens long;
these helpers turn them into one line that names what is valid.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import types
from collections.abc import Iterable

import ml_collections

from flowers_jax.config import ConfigError


def split_config_arg(spec: str) -> tuple[str, str | None]:
  """'configs/resnet18.py:frozen' -> ('configs/resnet18.py', 'frozen')."""
  path, _, arg = spec.partition(':')
  return path, (arg or None)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Imports the config file of `spec` ('configs/resnet18.py:frozen') and returns
  `get_config(arg)`."""
  path, arg = split_config_arg(spec)
  module = load_module(path)
  return module.get_config(arg) if arg is not None else module.get_config()


def load_module(path: str) -> types.ModuleType:
  """Imports the Python file at `path` (a config file, a script) as a module, by its path."""
  if not os.path.isfile(path):
    here = os.path.dirname(path) or '.'
    known = sorted(f for f in os.listdir(here) if f.endswith('.py') and f != '__init__.py') \
        if os.path.isdir(here) else []
    raise ConfigError(f'config file {path!r} not found' +
                      (f'; files in {here}/: {", ".join(known)}' if known else ''))
  # Registered (as import does) so that dataclasses and pickle find the module by its name;
  # the prefix keeps 'train.py' or 'data.py' from shadowing a real module.
  name = '_loaded_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


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
        valid = node.keys() if isinstance(node, ml_collections.ConfigDict) else ()
        raise unknown_key(dotted, part, valid, '.'.join(seen))
      node = node[part]
      seen.append(part)


def unknown_key(dotted: str, part: str, valid: Iterable[str], where: str) -> ConfigError:
  """The one-line error for `dotted`, whose `part` is not among `valid` (the keys in `where`)."""
  valid = sorted(valid)
  close = difflib.get_close_matches(part, valid, n=1)
  hint = f' (did you mean {close[0]!r}?)' if close else ''
  return ConfigError(f'unknown config key {dotted!r}{hint}; valid keys in {where or "the config"}: '
                     f'{", ".join(valid)}')


def config_from_argv(argv: list[str]) -> ml_collections.ConfigDict:
  """The config that `python -m flowers_jax.main` builds from `argv` (`--config SPEC` and
  `--config.a.b=value` overrides, other arguments ignored): parsed by ml_collections' own
  config flag, in a flag registry of its own."""
  from absl import flags
  from ml_collections import config_flags
  spec = config_spec_from_argv(argv)
  if spec is None:
    raise ConfigError('no --config SPEC in the arguments')
  args = ['config_from_argv', '--config', spec] + [a for a in argv if a.startswith('--config.')]
  registry = flags.FlagValues()
  # The override flags are found in `sys_argv` (default: sys.argv) when the flag is defined.
  config_flags.DEFINE_config_file('config', None, '', flag_values=registry, lock_config=True,
                                  sys_argv=args)
  registry(args)
  return registry.config
