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


def test_a_killed_run_leaves_no_autograph_files(tmp_path):
  """tf.data map functions are not autograph-converted (pipeline.graph_fn): converting wrote
  `__autograph_generated_file*.py` into the temp directory, removed only by atexit, so every
  process that ended without it (a kill -9, a test worker) left them: 27 per killed demo run,
  195 after two runs of the test suite."""
  import signal
  import time
  from flowers_jax import data
  data.make_fake_flowers(str(tmp_path / 'data'), num_classes=3, per_class=4, image_size=16,
                         seed=0)
  temp = tmp_path / 'tmp'
  temp.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['TMPDIR'] = str(temp)
  log = tmp_path / 'log'
  with open(log, 'w') as out:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'flowers_jax.main', '--config', 'configs/demo.py',
         '--workdir', str(tmp_path / 'run'), f'--config.data.dir={tmp_path / "data"}',
         '--config.model.num_classes=3', '--config.data.image_size=16',
         '--config.train.epochs=50', '--config.train.batch_size=4',
         '--config.optim.warmup_steps=0'], cwd=ROOT, env=env, stdout=out,
        stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while '(epoch 1):' not in log.read_text():
      assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert [p.name for p in temp.iterdir() if p.name.startswith('__autograph')] == []
