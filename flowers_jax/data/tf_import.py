"""TensorFlow, imported once for the input pipeline: `import_tf()`.

- GPUs are hidden from it, so JAX keeps them.
- triton is loaded first where it is installed: loading its library after TensorFlow's
  segfaults (tf 2.21, triton 3.8), and torchvision loads triton (via torch._dynamo).
- Its C++ libraries' import banners are dropped: the oneDNN notice (twice, each after absl's
  "before absl::InitializeLog()" line) and the CPU-feature notice. They are written to file
  descriptor 2, past Python and TF_CPP_MIN_LOG_LEVEL, so a newcomer's first screen began with
  four lines of TensorFlow's. Everything else written during the import is passed on.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile

BANNERS = ('All log messages before absl::InitializeLog() is called',
           'oneDNN custom operations are on',
           'This TensorFlow binary is optimized to use available CPU instructions',
           'To enable the following instructions')


def _import_triton_first() -> None:
  if 'tensorflow' not in sys.modules and importlib.util.find_spec('triton') is not None:
    try:
      importlib.import_module('triton')
    except Exception:  # noqa: BLE001 - triton is optional; TensorFlow is what matters here
      pass


def _without_banners(text: str) -> str:
  return ''.join(line for line in text.splitlines(True)
                 if not any(banner in line for banner in BANNERS))


def _import_quietly():
  """`import tensorflow` with file descriptor 2 captured; what is not a banner is written back."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      rest = _without_banners(captured.read().decode(errors='replace'))
      if rest:
        sys.stderr.write(rest)
        sys.stderr.flush()
  return tensorflow


def import_tf():
  """The tensorflow module (imported on first use, see the module docstring)."""
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  _import_triton_first()
  tf = _import_quietly()
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices; nothing to hide any more.
    pass
  return tf
