"""Test setup, before jax is imported: 4 fake CPU devices for the parallel tests, one XLA
compilation cache for the whole session, and pyproject's `filterwarnings` (deprecations are
errors) for the subprocesses the tests start.

The cache directory is made once, by the first process that loads this file (pytest itself,
or the xdist controller), and inherited through the environment by the xdist workers and by
every subprocess a test starts (the CLI, the multi-host workers): runs that compile the same
programs (the demo ResNet18 at the same sizes, in many tests) compile them once; programs
that take 0.5 s or more to compile are kept (jax's default: 1 s). It is removed when that first
process exits.
"""

import atexit
import os
import re
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='flowers_jax_tests_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


def _python_warnings(pytest_filters: list[str]) -> str:
  """pytest `filterwarnings` lines -> a PYTHONWARNINGS value with the same meaning.

  pytest's message field is a regex, PYTHONWARNINGS' a literal prefix: the lines here escape
  only literal characters (`\\(`), which are unescaped. Both let the last matching entry win.
  """
  entries = []
  for line in pytest_filters:
    action, message, category = (line.split(':', 3) + ['', ''])[:3]
    entries.append(':'.join((action, re.sub(r'\\(.)', r'\1', message), category)))
  return ','.join(entries)


def pytest_configure(config):
  os.environ['PYTHONWARNINGS'] = _python_warnings(config.getini('filterwarnings'))
