"""orbax checkpoints ('latest' and 'best') and clean stops on SIGTERM / SIGINT.

Layout, one orbax `CheckpointManager` each, steps named by the global step:

    workdir/checkpoints/latest/<step>/{state, meta}   # every epoch + on stop
    workdir/checkpoints/best/<step>/{state, meta}     # best validation accuracy

`best` is written before `latest` at the end of an epoch, so no kill point
leaves a `latest` that has seen an epoch whose better state `best` lacks: a run
killed between the two writes resumes from the previous `latest`, redoes the
epoch (the same numbers) and finds `best` already holding it. `best`'s meta is
the one record of the best epoch and its validation accuracy (`best_meta()`).

`state` is any pytree of arrays (the TrainState: step, params, batch_stats,
opt_state, rng). It is stored in its `flax.serialization.to_state_dict` form
(nested dicts), with typed PRNG keys (`jax.random.key`) stored as their key
data, so the files do not depend on the state's Python classes. `meta` is a
small JSON dict (epoch, step_in_epoch, val_accuracy, config, ...).

Every save blocks until the files are complete (`wait_until_finished`), so a
process that saves and then exits on SIGTERM loses nothing.

Restoring needs a `target` of the same structure (e.g. a freshly initialised
TrainState): leaves come back with the target's dtypes and placement, i.e.
jax.Arrays restore into the target leaves' shardings (single device, or
replicated / sharded over a `Mesh`), and numpy leaves restore as host numpy.
For `jax.pmap` states (leading device axis), save and restore the
unreplicated state (`flax.jax_utils.unreplicate` / `replicate`).

    ckpt = checkpoint.Checkpointer(workdir)
    restored = ckpt.restore_latest(state)          # None on a fresh workdir
    ...
    ckpt.save_best(step, state, {'epoch': e, 'val_accuracy': v})   # the caller decides
    ckpt.save_latest(step, state, {'epoch': e, 'step_in_epoch': 0})
    ckpt.best_meta()                                 # {'epoch': e, 'val_accuracy': v} | None
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

PyTree = Any


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _saveable_leaf(x: Any) -> Any:
  if _is_key(x):
    return jax.random.key_data(x)
  if isinstance(x, (np.generic, int, float, bool)):   # orbax wants arrays
    return np.asarray(x)
  return x


def _to_saveable(state: PyTree) -> PyTree:
  return jax.tree.map(_saveable_leaf, serialization.to_state_dict(state))


def _from_saved(target: PyTree, restored: PyTree) -> PyTree:
  template = serialization.to_state_dict(target)
  restored = jax.tree.map(
      lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
      if _is_key(t) else r, template, restored)
  return serialization.from_state_dict(target, restored)


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
  def default(x):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(x).tolist()
    raise TypeError(f'meta value {x!r} of type {type(x)} is not JSON-able')
  return json.loads(json.dumps(dict(meta), default=default))


class DiskSpaceError(OSError):
  """The disk cannot hold the run's checkpoints; raised before the first step."""


def state_bytes(state: PyTree) -> int:
  """Bytes of `state`'s arrays: an upper bound of what one checkpoint of it takes on disk.

  orbax compresses, but trained weights and optimizer moments barely compress (within 10%,
  tests/test_checkpoint.py); only zeros, e.g. a fresh momentum, do.
  """
  return sum(x.nbytes for x in jax.tree.leaves(_to_saveable(state)))


def free_bytes(path: str) -> int:
  """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _mib(n: int) -> str:
  return f'{n / 2**20:,.1f} MiB'


def _tree_bytes(path: str) -> int:
  """Bytes of the files under `path`; a file removed while it is counted counts 0."""
  total = 0
  for d, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(d, f))
      except FileNotFoundError:
        pass
  return total


def _least_over_processes(values: list[int]) -> list[int]:
  """Element-wise minimum of the non-negative ints `values` over all processes (the same answer
  on each). They travel as two int32 halves: without jax_enable_x64 an int64 would be cut."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  halves = np.asarray([[v >> 30, v & (2**30 - 1)] for v in values], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves))  # [processes, values, 2]
  return [min(int(hi) << 30 | int(lo) for hi, lo in gathered[:, i])
          for i in range(len(values))]


class Checkpointer:
  """'latest' and 'best' checkpoints of one run under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep_latest: int = 2):
    root = os.path.join(os.path.abspath(os.fspath(workdir)), 'checkpoints')
    self.directory = root
    # At most `keep_latest` latest + 1 best on disk, and one more while a save is written.
    self.copies_at_peak = keep_latest + 2
    self._latest = ocp.CheckpointManager(
        os.path.join(root, 'latest'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest))
    self._best = ocp.CheckpointManager(
        os.path.join(root, 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=1))

  # -- saving ----------------------------------------------------------------

  def check_room(self, state: PyTree) -> None:
    """Raises DiskSpaceError unless the disk can hold this run's checkpoints at their peak
    (`copies_at_peak` copies of `state`, counting what `checkpoints/` already holds).

    Every process takes the same decision: the least free space and the least existing size
    over all processes decide.
    """
    size = state_bytes(state)
    free, existing = _least_over_processes([free_bytes(self.directory),
                                            _tree_bytes(self.directory)])
    needed = self.copies_at_peak * size - existing
    if free < needed:
      raise DiskSpaceError(
          f'not enough disk for the checkpoints in {self.directory}: {self.copies_at_peak} '
          f'copies of a {_mib(size)} train state need {_mib(needed)} more, and {_mib(free)} '
          'are free; free some space, choose another '
          '--workdir, or train without checkpoints (--config.train.checkpoint=False)')

  @staticmethod
  def _save(mgr: ocp.CheckpointManager, step: int, state: PyTree,
            meta: dict[str, Any]) -> None:
    step = int(step)
    if step in mgr.all_steps():   # e.g. a stop right after an epoch's save
      mgr.delete(step)
    mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        meta=ocp.args.JsonSave(_jsonable(meta))))
    mgr.wait_until_finished()

  def save_latest(self, step: int, state: PyTree,
                  meta: dict[str, Any]) -> None:
    """Writes `state` and `meta` as the newest 'latest' checkpoint."""
    self._save(self._latest, step, state, meta)

  def save_best(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Replaces the 'best' checkpoint by `state`; `meta` should hold its epoch and score."""
    self._save(self._best, step, state, meta)

  def latest_meta(self) -> dict[str, Any] | None:
    """The meta of the newest 'latest' checkpoint (no state read), or None if there is none."""
    step = self._latest.latest_step()
    return None if step is None else dict(self._restore_meta(self._latest, step))

  def best_meta(self) -> dict[str, Any] | None:
    """The meta saved with the 'best' checkpoint, or None if there is none."""
    step = self._best.latest_step()
    return None if step is None else dict(self._restore_meta(self._best, step))

  # -- restoring -------------------------------------------------------------

  @staticmethod
  def _restore_meta(mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  @staticmethod
  def _restore(mgr: ocp.CheckpointManager, target: PyTree
               ) -> tuple[PyTree, dict[str, Any]] | None:
    step = mgr.latest_step()
    if step is None:
      return None
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_to_saveable(target)),
          meta=ocp.args.JsonRestore()))
    except ValueError as e:  # orbax names every mismatched leaf, with its values
      first = str(e).splitlines()[1:2] or ['']
      raise ValueError(f'the checkpoint in {mgr.directory}/{step} does not fit this model and '
                       f'optimizer (first mismatch: {first[0].strip()}); resume with the config '
                       'it was written with, or use a new --workdir') from None
    return _from_saved(target, out.state), dict(out.meta)

  def restore_latest(self, target: PyTree
                     ) -> tuple[PyTree, dict[str, Any]] | None:
    """(state, meta) of the newest 'latest' checkpoint, or None if none."""
    return self._restore(self._latest, target)

  def restore_best(self, target: PyTree
                   ) -> tuple[PyTree, dict[str, Any]] | None:
    """(state, meta) of the best checkpoint, or None if none."""
    return self._restore(self._best, target)

  def close(self) -> None:
    self._latest.close()
    self._best.close()


# ----------------------------------------------------------------------------
# Stop signals.

_SIGNAL = [0]  # the number of the first stop signal received, 0 for none
_PREVIOUS: dict[int, Any] = {}


def _handler(signum: int, frame: Any) -> None:
  name = signal.Signals(signum).name
  if _SIGNAL[0]:
    # Second signal: exit right away, whatever handler was there before (a worker
    # process may have inherited SIG_IGN): KeyboardInterrupt for SIGINT, the previous
    # handler or the default action (exit) for SIGTERM.
    logging.warning('%s again: exiting immediately.', name)
    previous = _PREVIOUS.get(signum)
    restore_signal_handlers()
    if signum == signal.SIGINT:
      raise KeyboardInterrupt
    if callable(previous):
      previous(signum, frame)
      return
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    return
  logging.warning('%s received: saving a checkpoint and stopping within a few steps '
                  '(send it again to exit immediately).', name)
  _SIGNAL[0] = int(signum)


def install_signal_handlers(
    signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
  """Records the first SIGTERM / SIGINT for `stop_signal()` instead of dying.

  The train loop sends `stop_signal()` along with every batch; the train step
  takes the largest over all hosts, so every process stops, saves 'latest' and
  exits (128 + signal number: 143 for SIGTERM, 130 for SIGINT) at the same
  step. A second signal is handled by the previous handler at once (Ctrl-C
  twice raises KeyboardInterrupt). Call from the main thread.
  """
  _SIGNAL[0] = 0
  for s in signums:
    previous = signal.signal(s, _handler)
    _PREVIOUS.setdefault(s, previous)


def restore_signal_handlers() -> None:
  """Puts back the handlers that `install_signal_handlers` replaced."""
  while _PREVIOUS:
    s, previous = _PREVIOUS.popitem()
    signal.signal(s, previous if previous is not None else signal.SIG_DFL)


def stop_signal() -> int:
  """The number of the stop signal received since `install_signal_handlers`, 0 for none."""
  return _SIGNAL[0]

