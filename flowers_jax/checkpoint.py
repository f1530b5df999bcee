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
small JSON dict (step, epoch, val_accuracy, config, ...).

Saves are asynchronous (orbax writes in a thread while training goes on); each
save first finishes the one before it (so `best` is complete before the `latest`
after it begins), and the loop calls `wait()` before it exits on SIGTERM or ends,
so nothing is lost. A save at step s
first deletes the steps >= s (a run resumed from an older `latest` has left
their timeline) and is forced: orbax would otherwise skip, without a word, a
step older than its newest.

Damaged and mismatched checkpoints are told apart. A checkpoint whose files
cannot be read (truncated, overwritten, missing) raises
`CheckpointDamagedError`, naming the part and orbax's / tensorstore's reason;
`restore_latest` then skips it with one line and tries the next older one, so
a run resumes from the newest intact `latest` (two are kept). One that reads
but does not fit the target raises `CheckpointMismatchError` (a ValueError)
naming the first leaf that differs, compared from the checkpoint's metadata
before any array is read (orbax itself restores some mismatched shapes
silently).

Restoring needs a `target` of the same structure (e.g. a freshly initialised
TrainState): leaves come back with the target's dtypes and placement, i.e.
jax.Arrays restore into the target leaves' shardings (single device, or
replicated / sharded over a `Mesh`), and numpy leaves restore as host numpy.
For `jax.pmap` states (leading device axis), save and restore the
unreplicated state (`flax.jax_utils.unreplicate` / `replicate`).

    ckpt = checkpoint.Checkpointer(workdir)
    restored = ckpt.restore_latest(state)          # None on a fresh workdir
    ...
    ckpt.save_best(step, state, {'step': s, 'val_accuracy': v})   # the caller decides
    ckpt.save_latest(step, state, {'step': s, ...}, wait=False)   # returns while it writes
    ckpt.wait()                                      # the last save is on disk
    ckpt.best_meta()                                 # {'epoch': e, 'val_accuracy': v} | None
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import threading
from typing import Any, Callable

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


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount, ...)."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint's files cannot be read (truncated, overwritten or missing)."""


class CheckpointMismatchError(ValueError):
  """An intact checkpoint of another model or optimizer than the one restoring it."""


def _reason(e: BaseException) -> str:
  """One line of what orbax / tensorstore / json said (tensorstore names the file)."""
  text = str(e).split(' [tensorstore_spec')[0].strip()
  text = text.splitlines()[0] if text else ''
  text = f'{type(e).__name__}: {text}' if text else type(e).__name__
  return text if len(text) <= 600 else text[:600] + '...'


def _key_name(key) -> str:
  """'fc' of a jax tree path's DictKey('fc'), '0' of SequenceKey(0), ..."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaves(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/fc/kernel': (shape, dtype name)} of a state dict or of orbax's metadata tree."""
  return {'/'.join(map(_key_name, path)): (tuple(v.shape), np.dtype(v.dtype).name)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_mismatch(saved: PyTree, target: PyTree) -> str | None:
  """The first leaf (path) where the saved tree's structure, shapes or dtypes differ from the
  target's, in words; None when they fit."""
  have, want = _leaves(saved), _leaves(target)
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  if missing:
    return (f'{missing[0]} is not in the checkpoint'
            + (f', nor {len(missing) - 1} more leaves' if len(missing) > 1 else ''))
  if extra:
    return (f'the checkpoint has {extra[0]}, which this state lacks'
            + (f', and {len(extra) - 1} more leaves' if len(extra) > 1 else ''))
  for k in sorted(want):
    if have[k] != want[k]:
      return (f'{k} is {have[k][1]}{list(have[k][0])} in the checkpoint and '
              f'{want[k][1]}{list(want[k][0])} here')
  return None


def all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (the same answer on each)."""
  return _least_over_processes([int(ok)])[0] == 1


class _DropUnretrieved(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records (each with a traceback)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in str(record.msg)


class _DropSaveWaitWarning(logging.Filter):
  """Drops orbax's "Waiting for previous save to complete took N seconds" warning: orbax adds
  our own `wait()` before each save (which keeps `best` ahead of `latest`) to that count, and a
  busy machine crossed its 1 s threshold on stderr (CI); the loop reports the time it blocked
  on saves itself (results.json `checkpoint_wait_s`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Waiting for previous save to complete took')


def _closed_loop(e: BaseException | None) -> bool:
  return isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'


def _echo_of_a_failure(unraisable) -> bool:
  """An orbax coroutine collected with its error, or a callback of its closed loop."""
  code = getattr(unraisable.object, 'cr_code', None) or getattr(unraisable.object, '__code__',
                                                                 None)
  return 'orbax' in getattr(code, 'co_filename', '') or _closed_loop(unraisable.exc_value)


class _HoldOrbaxLogs(logging.Filter):
  """Holds orbax's absl log records while an operation runs (`held`) or while an asynchronous
  save is being written in orbax's threads (`pending`: released by `Checkpointer.wait` when it
  succeeds), or drops its errors for good once one failed (`dropping`): the failure is
  reported in one line by the caller. Without `pending`, a failed asynchronous write logged
  its thread's errors (33 lines in CI) before the wait that reports it."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] | None = None
    self.pending: list[logging.LogRecord] | None = None
    self.dropping = False

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname.replace(os.sep, '/'):
      return True
    for hold in (self.held, self.pending):
      if hold is not None:
        hold.append(record)
        return False
    return not (self.dropping and record.levelno >= logging.ERROR)


def _pass_on(records: list[logging.LogRecord]) -> None:
  """Held records, through the filters again (held by an outer call, or passed on)."""
  for record in records:
    logging.getLogger(record.name).handle(record)


_ORBAX_LOGS = _HoldOrbaxLogs()


@functools.cache
def _install_echo_filters() -> None:
  """Once per process: drop the echoes of a failed orbax operation (see `_quiet_failures`)."""
  logging.getLogger('asyncio').addFilter(_DropUnretrieved())
  logging.getLogger('absl').addFilter(_ORBAX_LOGS)
  logging.getLogger('absl').addFilter(_DropSaveWaitWarning())
  unraisable, excepthook = sys.unraisablehook, sys.excepthook
  sys.unraisablehook = lambda u: None if _echo_of_a_failure(u) else unraisable(u)
  sys.excepthook = lambda t, e, tb: None if _closed_loop(e) else excepthook(t, e, tb)
  thread_hook = threading.excepthook
  threading.excepthook = lambda a: None if _closed_loop(a.exc_value) else thread_hook(a)


@contextlib.contextmanager
def _quiet_failures():
  """Runs an orbax read or write so that its failure is one error, not hundreds of lines.

  orbax reads and writes each array in an asyncio task of its own. When one fails, the call
  raises that error and the other tasks' errors are never retrieved: asyncio logs each one
  with a traceback when it is collected, their coroutines go to `sys.unraisablehook`,
  tensorstore's operations that finish after orbax closed their loop raise "Event loop is
  closed" in its threads (via `sys.excepthook`), and orbax's background threads log errors
  (845 lines for one save on a full disk, ~140 tracebacks for one truncated file; some before
  the call returns, some at exit). So, from the first call on, asyncio's "never retrieved"
  records, orbax's unraisable coroutines and "Event loop is closed" errors are dropped
  (anything else still reaches the previous hooks); orbax's log records are held during the
  call and passed on when it succeeds; when it fails they, and orbax's later error records,
  are dropped, and the caller reports the error it raised in one line.
  """
  _install_echo_filters()
  outer = _ORBAX_LOGS.held
  _ORBAX_LOGS.held = held = []
  try:
    yield
  except BaseException:
    _ORBAX_LOGS.dropping = True
    _ORBAX_LOGS.held = outer
    raise
  _ORBAX_LOGS.held = outer
  _pass_on(held)


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


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
    # Handlers named up front, so that a step's metadata can be read before its arrays.
    handlers = lambda: {'state': ocp.StandardCheckpointHandler(),
                        'meta': ocp.JsonCheckpointHandler()}
    self._latest = ocp.CheckpointManager(
        os.path.join(root, 'latest'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest),
        item_handlers=handlers())
    self._pending: tuple[ocp.CheckpointManager, int] | None = None  # a save being written
    self._best = ocp.CheckpointManager(
        os.path.join(root, 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=1), item_handlers=handlers())

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

  def _save(self, mgr: ocp.CheckpointManager, step: int, state: PyTree,
            meta: dict[str, Any], wait: bool = True) -> None:
    """Saves `step`; the previous save (of either manager) is finished first, so `best` is
    on disk before the `latest` that follows it starts. `wait=False` returns while orbax
    writes in its thread: `wait()` (the next save, the run's end, a stop) finishes it."""
    self.wait()
    step = int(step)
    # The same step (a stop right after an epoch's save) or newer ones (a run resumed from an
    # older checkpoint than the newest, which was damaged) are replaced.
    for old in mgr.all_steps():
      if old >= step:
        mgr.delete(old)
    with self._write_errors(mgr, step):
      saved = mgr.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_to_saveable(state)),
          meta=ocp.args.JsonSave(_jsonable(meta))))
    if not saved:
      raise CheckpointWriteError(f'orbax did not write the checkpoint {mgr.directory}/{step}')
    self._pending = (mgr, step)
    _ORBAX_LOGS.pending = []  # orbax's threads log while they write: held until `wait`
    if wait:
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is on disk; CheckpointWriteError if it failed (then the
    log records orbax's threads wrote meanwhile are dropped, else passed on)."""
    if self._pending is None:
      return
    mgr, step = self._pending
    self._pending = None
    try:
      with self._write_errors(mgr, step):
        mgr.wait_until_finished()
    finally:
      records, _ORBAX_LOGS.pending = _ORBAX_LOGS.pending or [], None
    _pass_on(records)

  @staticmethod
  @contextlib.contextmanager
  def _write_errors(mgr: ocp.CheckpointManager, step: int):
    """A failed write (a full disk, a lost mount, ...) as one CheckpointWriteError line."""
    try:
      with _quiet_failures():
        yield
    except Exception as e:  # noqa: BLE001
      full = 'RESOURCE_EXHAUSTED' in str(e) or 'No space left' in str(e)
      raise CheckpointWriteError(
          f'could not write the checkpoint {mgr.directory}/{step}'
          f'{" (the disk is full)" if full else ""}: {_reason(e)}; the older checkpoints '
          'are kept: free some space and run the same command again to resume') from None

  def save_latest(self, step: int, state: PyTree, meta: dict[str, Any],
                  wait: bool = True) -> None:
    """Writes `state` and `meta` as the newest 'latest' checkpoint (`wait`: see `_save`)."""
    self._save(self._latest, step, state, meta, wait)

  def save_best(self, step: int, state: PyTree, meta: dict[str, Any],
                wait: bool = True) -> None:
    """Replaces the 'best' checkpoint by `state`; `meta` should hold its step and score. It
    is finished before the next save starts (`_save`)."""
    self._save(self._best, step, state, meta, wait)

  def latest_meta(self) -> dict[str, Any] | None:
    """The meta of the newest 'latest' checkpoint (no state read), or None if there is none;
    CheckpointDamagedError if it cannot be read."""
    step = self._latest.latest_step()
    return None if step is None else self._restore_meta(self._latest, step)

  def best_meta(self) -> dict[str, Any] | None:
    """The meta saved with the 'best' checkpoint, or None if there is none;
    CheckpointDamagedError if it cannot be read."""
    step = self._best.latest_step()
    if step is None:
      return None
    try:
      return self._restore_meta(self._best, step)
    except CheckpointDamagedError as e:
      raise self._best_hint(e) from None

  def _best_hint(self, e: CheckpointDamagedError) -> CheckpointDamagedError:
    return CheckpointDamagedError(
        f'{e}; move {self._best.directory} away to go on without it (training then picks the '
        'best among the epochs still to run, predict uses latest)')

  # -- restoring -------------------------------------------------------------

  @staticmethod
  def _damaged(mgr: ocp.CheckpointManager, step: int, part: str,
               e: BaseException) -> CheckpointDamagedError:
    return CheckpointDamagedError(f'the checkpoint in {mgr.directory}/{step} is damaged '
                                  f'({part}: {_reason(e)})')

  @classmethod
  def _restore_meta(cls, mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
      with _quiet_failures():
        return dict(mgr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
    except Exception as e:  # noqa: BLE001 - any failure to read the files is damage
      raise cls._damaged(mgr, step, f'{step}/meta', e) from None

  @classmethod
  def _restore_step(cls, mgr: ocp.CheckpointManager, step: int, target: PyTree,
                    check: Callable[[dict], None] | None, parts: tuple[str, ...] = ()
                    ) -> tuple[PyTree, dict[str, Any]]:
    """(state, meta) of `step`: its meta, `check(meta)`, its structure against `target`'s,
    then its arrays. With `parts`, `target` is a dict of those top-level entries of the state
    only (e.g. params and batch_stats) and nothing else is read.
    CheckpointDamagedError / CheckpointMismatchError."""
    meta = cls._restore_meta(mgr, step)
    if check is not None:
      check(meta)
    try:
      with _quiet_failures():
        saved = mgr.item_metadata(step)['state']
      saved = getattr(saved, 'tree', saved)
      if saved is None:
        raise FileNotFoundError('no state metadata')
    except Exception as e:  # noqa: BLE001
      raise cls._damaged(mgr, step, f'{step}/state metadata', e) from None
    if parts:
      saved = {k: v for k, v in saved.items() if k in parts}
    problem = _first_mismatch(saved, _to_saveable(target))
    if problem:
      raise CheckpointMismatchError(
          f'the checkpoint in {mgr.directory}/{step} does not fit this model and optimizer '
          f'({problem}); resume with the config it was written with, or use a new --workdir')
    try:
      with _quiet_failures():
        if parts:
          return cls._restore_parts(mgr, step, target), meta
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_to_saveable(target))))
    except Exception as e:  # noqa: BLE001
      raise cls._damaged(mgr, step, f'{step}/state', e) from None
    return _from_saved(target, out.state), meta

  @staticmethod
  def _restore_parts(mgr: ocp.CheckpointManager, step: int, target: dict) -> dict:
    """The entries of `target` (a dict of numpy trees) from the step's state, as numpy; orbax's
    partial restore reads no other array."""
    target = jax.tree.map(np.asarray, target)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(os.path.join(str(mgr.directory), str(step), 'state'),
                            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                        partial_restore=True))

  def restore_latest(self, target: PyTree, *, check: Callable[[dict], None] | None = None,
                     say: Callable[[str], None] = _say, parts: tuple[str, ...] = ()
                     ) -> tuple[PyTree, dict[str, Any]] | None:
    """(state, meta) of the newest intact 'latest' checkpoint, or None if there is none.

    A damaged one is skipped with one line (`say`) and the next older one tried; every process
    skips the same steps. `check(meta)` runs on a step's meta before its arrays are read (the
    loop refuses a change of model there). CheckpointDamagedError when every one is damaged;
    CheckpointMismatchError when the newest intact one does not fit `target`. `parts`: as in
    `restore_best`.
    """
    damaged = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        restored, problem = self._restore_step(self._latest, step, target, check, parts), None
      except CheckpointDamagedError as e:
        restored, problem = None, str(e)
      if all_processes(restored is not None):
        if damaged:
          say(f'resuming from the older {self._latest.directory}/{step}')
        return restored
      damaged.append(problem or f'the checkpoint {self._latest.directory}/{step} is damaged '
                                'on another process')
      say(f'{damaged[-1]}; skipping it')
    if damaged:
      raise CheckpointDamagedError(
          f'no intact latest checkpoint in {self._latest.directory} (newest: {damaged[0]}); '
          'move it away to train from the start, or use a new --workdir')
    return None

  def restore_best(self, target: PyTree, *, parts: tuple[str, ...] = ()
                   ) -> tuple[PyTree, dict[str, Any]] | None:
    """(state, meta) of the best checkpoint, or None if none; with `parts`, only those
    top-level entries (`target` a dict of them). CheckpointDamagedError /
    CheckpointMismatchError."""
    step = self._best.latest_step()
    if step is None:
      return None
    try:
      return self._restore_step(self._best, step, target, None, parts)
    except CheckpointDamagedError as e:
      raise self._best_hint(e) from None

  def close(self) -> None:
    self.wait()
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

