"""Stopping a 2-process run (2 x 2 fake CPU devices, gloo on 127.0.0.1).

SIGTERM to one: every process must stop at the same step, save `latest` once (orbax saves are
collectives) and exit with 143 within seconds (before this change: both still running 60 s
later, nothing saved). Resuming from such a checkpoint is tested in test_train.py.

An error in one: it exits at once, and the other, blocked in a collective, is ended after the
heartbeat timeout (before: both hung for jax's 5-minute shutdown barrier, then aborted).
"""

import contextlib
import os
import signal
import subprocess
import time

from flowers_jax import checkpoint, data
from test_parallel import _cli, _free_port


def _wait_for(proc_out: str, text: str, timeout: float) -> None:
  end = time.time() + timeout
  while time.time() < end:
    if os.path.exists(proc_out) and text in open(proc_out).read():
      return
    time.sleep(0.2)
  raise AssertionError(f'{text!r} not seen in {proc_out} after {timeout}s:\n'
                       + (open(proc_out).read()[-3000:] if os.path.exists(proc_out) else ''))


def _tails(logs: list[str]) -> str:
  return '\n'.join(f'--- {f}:\n' + open(f).read()[-2000:] for f in logs if os.path.exists(f))


@contextlib.contextmanager
def _two_processes(tmp_path, extra, entry=('-m', 'flowers_jax.main')):
  """Starts the CLI as 2 processes x 2 devices on a 4-class set for 50 epochs; yields the
  processes and their log files, and kills whatever still runs on the way out. A wait that
  times out inside fails with both logs."""
  data_dir = tmp_path / 'data'
  data.make_fake_flowers(str(data_dir), num_classes=4, per_class=40, image_size=20, seed=0)
  port = _free_port()
  logs = [str(tmp_path / f'p{i}.log') for i in range(2)]
  procs = [_cli(tmp_path / 'run', data_dir, port, i, local_devices=2, log=logs[i], entry=entry,
                extra=['--config.train.epochs=50', *extra]) for i in range(2)]
  try:
    yield procs, logs
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f'a process still running after {e.timeout} s:\n{_tails(logs)}') from e
  finally:
    for p in procs:
      p.kill()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  with _two_processes(tmp_path, ['--config.train.log_every=1']) as (procs, logs):
    _wait_for(logs[0], 'step 3/', timeout=300)
    procs[1].send_signal(signal.SIGTERM)
    t0 = time.time()
    codes = [p.wait(timeout=120) for p in procs]
    exited_after = time.time() - t0
  outs = [open(f).read() for f in logs]
  print(f'both processes exited {exited_after:.1f}s after SIGTERM to process 1')
  assert codes == [143, 143], _tails(logs)
  assert 'interrupted: saved a checkpoint' in outs[0]
  meta = checkpoint.Checkpointer(str(tmp_path / 'run')).latest_meta()
  assert meta is not None and (meta['step_in_epoch'] > 0 or meta['epoch'] > 0)


# Process 1 of the CLI, its 6th batch raising (the stop flag is read as each batch is made).
FAILING_PROCESS_1 = (
    'import sys\n'
    'from flowers_jax import checkpoint, main\n'
    'if "--config.distributed.process_id=1" in sys.argv:\n'
    '  calls, real = [], checkpoint.stop_signal\n'
    '  def failing():\n'
    '    calls.append(1)\n'
    '    if len(calls) == 6:\n'
    '      raise RuntimeError("simulated failure in process 1")\n'
    '    return real()\n'
    '  checkpoint.stop_signal = failing\n'
    'main.run()\n')


def test_an_error_in_one_process_ends_every_process_within_the_heartbeat_timeout(tmp_path):
  with _two_processes(tmp_path, ['--config.distributed.heartbeat_timeout_s=10'],
                      entry=('-c', FAILING_PROCESS_1)) as (procs, logs):
    failed = procs[1].wait(timeout=300)
    t0 = time.time()
    ended = procs[0].wait(timeout=90)
    after = time.time() - t0
  print(f'process 0 ended {after:.1f}s after process 1 failed')
  assert failed == 1, _tails(logs)
  assert 'RuntimeError: simulated failure in process 1' in open(logs[1]).read()
  assert ended != 0 and after < 60, _tails(logs)
