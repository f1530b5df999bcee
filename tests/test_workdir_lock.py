"""One run per workdir (`flowers_jax/workdir_lock.py`): a second run stops at once with one line
naming the holder, the first goes on untouched, and a killed holder blocks nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flowers_jax import data
from flowers_jax.workdir_lock import WorkdirInUseError, WorkdirLock
from test_cli import ROOT, one_error_line, run_cli, tiny_run_args


def test_a_second_lock_on_a_held_workdir_names_the_holder(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirInUseError, match=rf'pid {os.getpid()} on host '):
      WorkdirLock(str(tmp_path)).acquire()
  with WorkdirLock(str(tmp_path)):  # released when the first block ended
    pass


def test_a_lock_left_by_a_killed_process_blocks_nothing(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from flowers_jax.workdir_lock import '
       'WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); '
       'time.sleep(600)', str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(WorkdirInUseError, match=f'pid {holder.pid} '):
      WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with WorkdirLock(str(tmp_path)):
    assert f'pid {os.getpid()} ' in (tmp_path / '.lock.process_0').read_text()


def test_a_second_run_on_a_workdir_in_use_stops_at_once_and_the_first_is_untouched(tmp_path):
  data_dir = tmp_path / 'data'
  data.make_fake_flowers(str(data_dir), num_classes=3, per_class=4, image_size=16, seed=0)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL')}
  first = subprocess.Popen([sys.executable, '-m', 'flowers_jax.main',
                            *tiny_run_args(tmp_path / 'shared', data_dir, epochs=3)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  lock = tmp_path / 'shared' / '.lock.process_0'
  deadline = time.time() + 120
  while not (lock.exists() and 'pid' in lock.read_text()):
    assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
    time.sleep(0.2)
  t0 = time.time()
  second = run_cli(*tiny_run_args(tmp_path / 'shared', data_dir, epochs=3), timeout=60)
  seconds = time.time() - t0
  line = one_error_line(second)
  assert f'in use by another run (pid {first.pid} on host ' in line, line
  assert seconds < 10, seconds
  out = first.communicate(timeout=300)[0]
  assert first.returncode == 0, out[-3000:]
  assert first.pid and second.returncode == 2
  lone = run_cli(*tiny_run_args(tmp_path / 'lone', data_dir, epochs=3))
  assert lone.returncode == 0, lone.stderr[-3000:]
  rows = {name: [json.loads(r) for r in (tmp_path / name / 'metrics.jsonl').open()]
          for name in ('shared', 'lone')}
  assert len(rows['shared']) == 3
  for a, b in zip(rows['shared'], rows['lone']):
    assert {k: a[k] for k in ('train_loss', 'val_loss', 'val_accuracy')} == \
        {k: b[k] for k in ('train_loss', 'val_loss', 'val_accuracy')}
  results = [json.loads((tmp_path / n / 'results.json').read_text()) for n in ('shared', 'lone')]
  assert results[0]['test_accuracy'] == results[1]['test_accuracy']
  assert results[0]['test_loss'] == results[1]['test_loss']
