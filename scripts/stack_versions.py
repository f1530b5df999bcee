"""Prints the test stack in one line: Python and the versions of the packages the project rests
on, read from the installed metadata (nothing is imported). `make test` prints it first, so
every CI log says which stack it tested.

    python scripts/stack_versions.py
    stack: python 3.12.1, jax 0.12.0.1, jaxlib 0.12.0.1, flax 0.12.12, ...
"""

import platform
from importlib import metadata

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-cpu',
            'tensorflow-datasets', 'numpy', 'torch', 'torchvision')


def versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


if __name__ == '__main__':
  print('stack: ' + ', '.join(f'{k} {v}' for k, v in versions().items()), flush=True)
