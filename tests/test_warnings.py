"""Deprecations are errors in the tests and in the processes they start (pyproject's
`filterwarnings`, passed on by conftest.py as PYTHONWARNINGS), so an API that jax, flax, optax,
orbax, tfds or numpy deprecate fails CI before it fails a user's run."""

import subprocess
import sys
import warnings

import pytest

WARN = 'import warnings; warnings.warn("{}", {})'


@pytest.mark.parametrize('category', [DeprecationWarning, PendingDeprecationWarning,
                                      FutureWarning])
def test_a_deprecation_in_a_test_is_an_error(category):
  with pytest.raises(category):
    warnings.warn('some API is deprecated', category, stacklevel=1)


@pytest.mark.parametrize('message,category,fails', [
    ('some API is deprecated', 'DeprecationWarning', True),
    ('a dtype will change', 'FutureWarning', True),
    ('the load_module() method is deprecated and slated for removal', 'DeprecationWarning',
     False),  # ml_collections', ignored by the pyproject line
    ('not a deprecation', 'UserWarning', False),
])
def test_a_deprecation_in_a_subprocess_is_an_error(message, category, fails):
  proc = subprocess.run([sys.executable, '-c', WARN.format(message, category)],
                        capture_output=True, text=True)
  assert (proc.returncode != 0) == fails, proc.stderr
  assert (f'{category}: {message}' in proc.stderr) == (fails or category == 'UserWarning')
