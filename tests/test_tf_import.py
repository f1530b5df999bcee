"""TensorFlow is imported without its C++ import banners, and nothing else it says is lost."""

import os
import subprocess
import sys

from flowers_jax.data import tf_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_the_banners_are_dropped():
  text = ('WARNING: All log messages before absl::InitializeLog() is called are written to '
          'STDERR\nI0000 port.cc:153] oneDNN custom operations are on. You may see ...\n'
          'E0000 something that matters\n')
  assert tf_import._without_banners(text) == 'E0000 something that matters\n'


def test_importing_tensorflow_prints_no_banner():
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CPP_MIN_LOG_LEVEL', 'XLA_FLAGS')}
  code = ('import sys; from flowers_jax.data import tf_import; tf = tf_import.import_tf(); '
          'print("kept", file=sys.stderr); print(tf.constant(2).numpy() + 1)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == '3' and proc.stderr == 'kept\n', proc.stderr
