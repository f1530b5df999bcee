"""`flowers_jax.predict`: the right classes for held-out images, corrupt images named and skipped.

One ResNet18 is trained through the real loop (`train.train_and_evaluate`, configs/demo.py) on a
3-class synthetic set at 32 px (36 train images, 7 epochs of 3 steps: ~1.5 min on 2 cores) until
it classifies most validation images; predict then runs on the 18 test images (never trained on)
from the files alone and must agree with the run's own test evaluation.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from flowers_jax import config_utils, data, predict, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(run dir, data dir): demo ResNet18 trained on 3 classes x 12 train images, 32 px."""
  root = tmp_path_factory.mktemp('predict')
  data_dir, workdir = str(root / 'data'), str(root / 'run')
  data.make_fake_flowers(data_dir, num_classes=NUM_CLASSES, per_class=24, image_size=40,
                         seed=0, splits=(0.5, 0.25))
  c = config_utils.load_config(os.path.join(ROOT, 'configs', 'demo.py'))
  c.model.num_classes = NUM_CLASSES
  c.data.dir = data_dir
  c.data.image_size = 32
  c.parallel = 'sharded'
  c.train.epochs = 7
  c.train.batch_size = 12
  c.train.eval_batch_size = 12
  c.optim.warmup_steps = 3
  results = train.train_and_evaluate(c, workdir)
  assert results['best_val_accuracy'] >= 0.8, results
  return workdir, data_dir


def _test_images(data_dir):
  """{path: 0-based label} of the test split."""
  labels = scipy.io.loadmat(os.path.join(data_dir, 'imagelabels.mat'))['labels'].ravel()
  ids = scipy.io.loadmat(os.path.join(data_dir, 'setid.mat'))['tstid'].ravel()
  return {os.path.join(data_dir, 'jpg', 'image_%05d.jpg' % i): int(labels[i - 1]) - 1
          for i in ids}


def test_predicts_held_out_images(trained):
  workdir, data_dir = trained
  truth = _test_images(data_dir)
  run = predict.load_run(workdir)
  assert run.checkpoint == 'best'
  assert run.class_names == ('class_000', 'class_001', 'class_002')
  preds, errors = predict.predict_files(run, list(truth), top=2, batch=5)  # 18 images: 4 batches
  assert not errors
  assert [p['path'] for p in preds] == list(truth)
  hits = [p['top'][0]['index'] == truth[p['path']] for p in preds]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  # The run's own eval transform and checkpoint: the same accuracy as its test evaluation.
  assert np.mean(hits) == pytest.approx(results['test_accuracy'])
  assert np.mean(hits) >= 0.8  # chance: 1/3
  for p in preds:
    probs = [t['probability'] for t in p['top']]
    assert len(probs) == 2 and probs[0] >= probs[1] and 0.0 < sum(probs) <= 1.0 + 1e-6


def test_class_names_are_stored_in_the_run(trained):
  workdir, _ = trained
  predict.load_run(workdir)
  with open(os.path.join(workdir, predict.CLASS_NAMES_FILE)) as f:
    assert json.load(f) == ['class_000', 'class_001', 'class_002']


def test_corrupt_image_is_named_and_skipped(trained, tmp_path):
  workdir, data_dir = trained
  truth = _test_images(data_dir)
  folder = tmp_path / 'photos'
  folder.mkdir()
  good = sorted(truth)[:2]
  for p in good:
    shutil.copy(p, folder)
  (folder / 'broken.jpg').write_bytes(b'this is not a jpeg')
  (folder / 'notes.txt').write_text('not an image: ignored in a directory')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-m', 'flowers_jax.predict', '--workdir', workdir,
                         str(folder), '--json', '--top', '3'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  skipped = [x for x in proc.stderr.splitlines() if x.startswith('skipped ')]
  assert len(skipped) == 1 and 'broken.jpg' in skipped[0], proc.stderr
  out = json.loads(proc.stdout)
  assert out['checkpoint'] == 'best'
  assert [os.path.basename(p['path']) for p in out['predictions']] == \
      [os.path.basename(p) for p in good]
  assert [e['path'] for e in out['errors']] == [str(folder / 'broken.jpg')]
  assert all(len(p['top']) == 3 for p in out['predictions'])


def test_nothing_predictable_fails(trained, tmp_path, capsys):
  workdir, _ = trained
  bad = tmp_path / 'truncated.jpg'
  bad.write_bytes(b'\xff\xd8\xff\xe0' + b'\0' * 20)
  assert predict.main(['--workdir', workdir, str(bad), str(tmp_path / 'missing.png')]) == 1
  err = capsys.readouterr().err
  assert 'truncated.jpg' in err and 'missing.png' in err
  assert 'no image could be predicted' in err


def test_falls_back_to_latest_and_says_so(trained, tmp_path, capsys):
  workdir, _ = trained
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'checkpoints' / 'best')
  run = predict.load_run(str(copy))
  assert run.checkpoint == 'latest'
  assert 'no best checkpoint' in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
  assert predict.main(['--workdir', str(tmp_path / 'nope'), 'x.jpg']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'does not exist' in err[0]


def _peak_rss_kb(workdir, folder) -> int:
  """Peak RSS of `python -m flowers_jax.predict` on `folder` (its own process)."""
  code = ('import resource, sys; from flowers_jax import predict; '
          'rc = predict.main(sys.argv[1:]); '
          'print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-c', code, '--workdir', workdir, str(folder),
                         '--batch', '4', '--json'], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return int(proc.stdout.strip().splitlines()[-1])


def test_memory_is_flat_in_the_number_of_images(trained, tmp_path):
  """4 and 28 photos of 2400 x 1600 (11 MiB each decoded): decoding them all first held
  ~0.3 GB more for 28; batch by batch, the peak is the same within 100 MB."""
  from PIL import Image
  workdir, _ = trained
  photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1600, 2400, 3), np.uint8))
  for n in (4, 28):
    (tmp_path / str(n)).mkdir()
    for i in range(n):
      photo.save(tmp_path / str(n) / f'{i:02d}.jpg', quality=90)
  few, many = (_peak_rss_kb(workdir, tmp_path / str(n)) for n in (4, 28))
  assert many - few < 100 * 1024, (few, many)


def test_hidden_directories_are_not_predicted(tmp_path):
  for d in ('photos', 'photos/.thumbnails', 'photos/trip'):
    (tmp_path / d).mkdir()
  for f in ('photos/a.jpg', 'photos/.thumbnails/a.jpg', 'photos/trip/b.png', 'photos/.c.jpg'):
    (tmp_path / f).write_bytes(b'')
  paths, errors = predict.expand_paths([str(tmp_path / 'photos')])
  assert paths == [str(tmp_path / 'photos' / 'a.jpg'), str(tmp_path / 'photos' / 'trip' / 'b.png')]
  assert errors == []


def test_only_the_model_variables_are_read(trained, monkeypatch):
  """The optimizer state (as large again as the params with momentum) stays on disk."""
  from flowers_jax import checkpoint
  read = []
  real = checkpoint.Checkpointer._restore_parts
  monkeypatch.setattr(checkpoint.Checkpointer, '_restore_parts', staticmethod(
      lambda mgr, step, target: read.append(sorted(target)) or real(mgr, step, target)))
  run = predict.load_run(trained[0])
  assert read == [['batch_stats', 'params']]
  assert sorted(run.variables) == ['batch_stats', 'params']
