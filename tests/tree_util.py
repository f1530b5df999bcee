"""Pytree helpers shared by the tests."""

import jax
import numpy as np


def _key(entry) -> str:
  """One path entry as text: a dict key, a sequence index or an attribute name."""
  for field in ('key', 'idx', 'name'):
    if hasattr(entry, field):
      return str(getattr(entry, field))
  return str(entry)


def flat(tree) -> dict:
  """{'a/b/c': numpy array} for every leaf of `tree`, the path's keys joined by '/'."""
  return {'/'.join(_key(k) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
