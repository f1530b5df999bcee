"""Damaged checkpoints are told from mismatched ones and named: a run resumes from the newest
intact `latest` with one line, and stops with one line only when none is intact; predict on a
damaged `best` is one line, without orbax's echoes."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flowers_jax import checkpoint, data
from test_checkpoint import _assert_identical, _state
from test_cli import ROOT, one_error_line, run_cli, tiny_run_args


def _truncate_data_files(step_dir: str) -> None:
  """Cuts the state's data files to 100 bytes (as a full disk or a killed copy would)."""
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  assert files
  for f in files:
    os.truncate(f, min(100, os.path.getsize(f) // 2))


DAMAGE = {  # how: (function of the step directory, the part the message names: its start)
    'truncated data files': (_truncate_data_files, 'state'),
    'garbage manifest': (lambda d: open(os.path.join(d, 'state', 'manifest.ocdbt'), 'wb')
                         .write(b'garbage' * 10), 'state metadata'),
    'garbage meta': (lambda d: open(os.path.join(d, 'meta', 'metadata'), 'w').write('{not'),
                     'meta'),
    'state removed': (lambda d: shutil.rmtree(os.path.join(d, 'state')), 'state metadata'),
}


def _two_latest(workdir, damage_6=None):
  """A fresh Checkpointer on `workdir` holding latest/3 and latest/6 (`damage_6` applied)."""
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save_latest(3, _state(seed=3, steps=3), {'epoch': 1})
  ckpt.save_latest(6, _state(seed=6, steps=6), {'epoch': 2})
  ckpt.close()
  if damage_6:
    damage_6(os.path.join(workdir, 'checkpoints', 'latest', '6'))
  return checkpoint.Checkpointer(workdir)


@pytest.mark.parametrize('how', sorted(DAMAGE))
def test_a_damaged_newest_latest_is_skipped_for_the_older_one(tmp_path, how):
  damage, part = DAMAGE[how]
  said = []
  got, meta = _two_latest(tmp_path, damage).restore_latest(_state(), say=said.append)
  _assert_identical(got, _state(seed=3, steps=3))
  assert meta['epoch'] == 1
  assert len(said) == 2, said
  assert said[0].startswith(f'the checkpoint in {tmp_path}/checkpoints/latest/6 is damaged '
                            f'(6/{part}') and said[0].endswith('; skipping it'), said[0]
  assert said[1] == f'resuming from the older {tmp_path}/checkpoints/latest/3'


def test_the_reason_names_the_file_and_orbax_error(tmp_path):
  said = []
  _two_latest(tmp_path, DAMAGE['truncated data files'][0]).restore_latest(_state(),
                                                                          say=said.append)
  assert 'Requested byte range' in said[0] and 'latest/6/state/' in said[0], said[0]


def test_no_intact_latest_is_one_error(tmp_path):
  ckpt = _two_latest(tmp_path, DAMAGE['garbage meta'][0])
  DAMAGE['garbage meta'][0](str(tmp_path / 'checkpoints' / 'latest' / '3'))
  with pytest.raises(checkpoint.CheckpointDamagedError, match='no intact latest checkpoint in '
                     rf'{tmp_path}/checkpoints/latest \(newest: the checkpoint in .*/6 is damaged'):
    ckpt.restore_latest(_state(), say=lambda _: None)


def test_a_mismatch_names_the_first_leaf_that_differs(tmp_path):
  ckpt = _two_latest(tmp_path)
  other = _state()
  other = other.replace(params={**other.params, 'fc': {'kernel': np.zeros((4, 7), np.float32),
                                                       'bias': np.zeros(7, np.float32)}})
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'latest/6 does not fit this model and optimizer \(params/fc/bias is '
                           r'float32\[5\] in the checkpoint and float32\[7\] here\)'):
    ckpt.restore_latest(other)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'\(the checkpoint has batch_stats/bn/mean, which this state lacks, '
                           r'and 1 more leaves\)'):
    ckpt.restore_latest(_state().replace(batch_stats={}))


def test_a_save_older_than_the_newest_step_is_written_and_replaces_the_newer(tmp_path):
  """After resuming from latest/3 (latest/6 damaged), the next save (step 4) is written, not
  skipped as orbax does for a step below its newest, and latest/6 of the old timeline goes."""
  ckpt = _two_latest(tmp_path, DAMAGE['garbage meta'][0])
  ckpt.save_latest(4, _state(seed=4, steps=4), {'epoch': 1, 'step_in_epoch': 1})
  assert sorted(os.listdir(tmp_path / 'checkpoints' / 'latest')) == ['3', '4']
  got, meta = checkpoint.Checkpointer(tmp_path).restore_latest(_state())
  _assert_identical(got, _state(seed=4, steps=4))
  assert meta['step_in_epoch'] == 1


# ------------------------------------------------------------------ the CLI and predict


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(data dir, a finished 2-epoch run: latest/3, latest/6 and best/<step>)."""
  root = tmp_path_factory.mktemp('damaged')
  data.make_fake_flowers(str(root / 'data'), num_classes=3, per_class=4, image_size=16, seed=0)
  proc = run_cli(*tiny_run_args(root / 'run', root / 'data'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / 'data', root / 'run'


def test_a_run_resumes_from_the_older_latest_and_ends_as_an_undamaged_run(tmp_path, trained):
  data_dir, run = trained
  copy = tmp_path / 'run'
  shutil.copytree(run, copy)
  os.remove(copy / 'results.json')
  latest = sorted(int(s) for s in os.listdir(copy / 'checkpoints' / 'latest'))
  DAMAGE['truncated data files'][0](str(copy / 'checkpoints' / 'latest' / str(latest[-1])))
  proc = run_cli(*tiny_run_args(copy, data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'checkpoints/latest/{latest[-1]} is damaged (' in proc.stdout
  assert f'resuming from the older {copy}/checkpoints/latest/{latest[0]}' in proc.stdout
  got, want = (json.loads((d / 'results.json').read_text()) for d in (copy, run))
  for key in ('best_epoch', 'best_val_accuracy', 'test_accuracy', 'test_loss'):
    assert got[key] == want[key], key
  rows = [[json.loads(r) for r in (d / 'metrics.jsonl').open()] for d in (copy, run)]
  assert [r['train_loss'] for r in rows[0]] == [r['train_loss'] for r in rows[1]]


def test_every_latest_damaged_is_one_line(tmp_path, trained):
  data_dir, run = trained
  copy = tmp_path / 'run'
  shutil.copytree(run, copy)
  for step in os.listdir(copy / 'checkpoints' / 'latest'):
    DAMAGE['garbage manifest'][0](str(copy / 'checkpoints' / 'latest' / step))
  line = one_error_line(run_cli(*tiny_run_args(copy, data_dir)))
  assert 'no intact latest checkpoint in ' in line and 'is damaged (' in line, line


def test_predict_on_a_damaged_best_is_one_line(tmp_path, trained):
  data_dir, run = trained
  copy = tmp_path / 'run'
  shutil.copytree(run, copy)
  best = copy / 'checkpoints' / 'best'
  DAMAGE['truncated data files'][0](str(best / os.listdir(best)[0]))
  image = sorted(glob.glob(str(data_dir / 'jpg' / '*.jpg')))[0]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-m', 'flowers_jax.predict', '--workdir', str(copy),
                         image], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  line = one_error_line(proc)
  assert f'the checkpoint in {best}/' in line and 'is damaged (' in line, line
  assert 'Requested byte range' in line


def test_a_checkpoint_write_that_fails_is_one_line(tmp_path, trained):
  """A file-size limit of 8 MB (RLIMIT_FSIZE, SIGXFSZ ignored) fails orbax's first write of
  the 128 MiB train state as a full disk would: one line, where a full disk gave 845 (orbax's
  background errors, "Event loop is closed" tracebacks)."""
  data_dir, _ = trained
  limited = ('import resource, runpy, signal, sys; '
             'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
             'resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20)); '
             "sys.argv[0] = 'flowers_jax.main'; "
             "runpy.run_module('flowers_jax.main', run_name='__main__')")
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}  # no cache file over the limit
  proc = subprocess.run([sys.executable, '-c', limited,
                         *tiny_run_args(tmp_path / 'run', data_dir)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  line = one_error_line(proc)
  assert line.startswith(f'error: could not write the checkpoint {tmp_path}/run/checkpoints/'), line
  assert 'the older checkpoints are kept' in line
