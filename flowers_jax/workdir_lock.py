"""One run per workdir: an exclusive `flock` on `workdir/.lock.process_<i>`, held for the run.

Two commands on one `--workdir` would both train and write the same checkpoints (one of them
ended in orbax's `Item "meta" was not found`, the other deleted steps it did not write). The
run takes this lock before it reads or writes anything in the workdir; a second run finds it
held and stops at once with one line naming the holder (pid, host, start time, written into
the lock file by the holder).

- A lock left by a killed process (kill -9, a crashed host) blocks nothing: the kernel drops a
  `flock` when its holder's file descriptor closes, which a dying process does. The file stays,
  with the old holder's line, and is taken over by the next run.
- Multi-host runs: process `i` locks `.lock.process_<i>`, so the processes of one run do not
  block each other whether they share one workdir or use one each, and two runs collide on
  every index they share. Every process takes the same decision: the result is all-gathered,
  and if any process finds its lock held, all of them stop.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

import jax


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir."""


def _path(workdir: str, process: int) -> str:
  return os.path.join(workdir, f'.lock.process_{process}')


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip() or 'unknown'
  except OSError:
    return 'unknown'


def _all_processes_agree(ok: bool) -> list[bool]:
  """`ok` of every process, in process order (the same list on each)."""
  if jax.process_count() == 1:
    return [ok]
  import numpy as np
  from jax.experimental import multihost_utils
  return [bool(x) for x in np.asarray(multihost_utils.process_allgather(np.int32(ok)))]


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this process until the block ends.

  Raises WorkdirInUseError (one line: the holder's pid, host and start time) when another
  run holds it; on many hosts every process raises it when any one of them finds its lock held.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = _path(self.workdir, jax.process_index())
    self._fd: int | None = None

  def acquire(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      held = True
    except BlockingIOError:
      held = False
    agreed = _all_processes_agree(held)
    if not all(agreed):
      holder = None if held else _holder(self.path)
      os.close(fd)  # releases this process's lock if it got one: the run does not start
      if holder is None:
        raise WorkdirInUseError(
            f'{self.workdir} is in use by another run (process {agreed.index(False)} of this '
            'run found its lock held); wait for it to finish, stop it, or choose another '
            '--workdir')
      raise WorkdirInUseError(
          f'{self.workdir} is in use by another run ({holder}); wait for it to finish, stop '
          'it, or choose another --workdir')
    os.ftruncate(fd, 0)
    os.write(fd, (f'pid {os.getpid()} on host {socket.gethostname()}, started '
                  f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n').encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # drops the flock; the file stays for the next run to take over
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
