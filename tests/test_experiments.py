"""scripts/run_experiments.py (smoke: runs, then skips what is finished) and scripts/report.py."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from flowers_jax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
report = config_utils.load_module(os.path.join(ROOT, 'scripts', 'report.py'))
run_experiments = config_utils.load_module(os.path.join(ROOT, 'scripts', 'run_experiments.py'))


def run_script(*args, timeout=600):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'run_experiments.py'),
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope='module')
def smoke_runs(tmp_path_factory):
  """One smoke run (ResNet18 frozen) of the study suite; returns the runs directory."""
  out = str(tmp_path_factory.mktemp('runs'))
  proc = run_script('--suite', 'study', '--smoke', '--out', out, '--only', 'resnet18_frozen')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = [x for x in proc.stdout.splitlines() if x.startswith('resnet18_frozen')]
  assert ' ok ' in lines[-1] and 'test ' in lines[-1], proc.stdout
  return out


def test_second_call_only_reports(smoke_runs):
  t0 = time.time()
  proc = run_script('--suite', 'study', '--smoke', '--out', smoke_runs, '--only', 'resnet18_frozen')
  elapsed = time.time() - t0
  assert proc.returncode == 0, proc.stdout + proc.stderr
  frozen = [x for x in proc.stdout.splitlines() if x.startswith('resnet18_frozen')]
  assert len(frozen) == 1 and ' done ' in frozen[0] and 'test ' in frozen[0], proc.stdout
  assert 'running' not in proc.stdout and elapsed < 30  # no training process was started


def test_a_finished_run_of_another_config_is_stale_not_done(smoke_runs):
  proc = run_script('--suite', 'study', '--smoke', '--out', smoke_runs, '--only',
                    'resnet18_frozen', '--config.optim.lr=0.5', timeout=120)
  line = [x for x in proc.stdout.splitlines() if x.startswith('resnet18_frozen')][-1]
  assert ' stale ' in line and 'made with another config (optim.lr)' in line, proc.stdout
  assert proc.returncode == 1
  assert 'running' not in proc.stdout


def test_a_missing_data_dir_is_one_line_before_any_run(tmp_path):
  out = tmp_path / 'runs'
  proc = run_script('--suite', 'study', '--data-dir', str(tmp_path / 'nope'), '--out', str(out),
                    timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: --data-dir {tmp_path / "nope"} is not a directory; pass the Flowers102 files '
      '(jpg/, imagelabels.mat, setid.mat), or --smoke alone')
  assert not out.exists()


def test_report_from_smoke_runs(smoke_runs, tmp_path):
  out = str(tmp_path / 'report')
  text = report.write_report(smoke_runs, out)
  assert '| resnet18 | frozen |' in text
  row = next(x for x in text.splitlines() if x.startswith('| resnet18 | frozen |'))
  assert '| 0.801 |' in row  # the study's number beside ours
  with open(os.path.join(out, 'curves_resnet18.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert '![ResNet18](curves_resnet18.png)' in text
  assert '### ResNet18:' in text and 'not computed' not in text
  # The confusion matrix came from the best checkpoint on the test split; it is cached.
  confusion = np.load(os.path.join(smoke_runs, 'resnet18_frozen', 'confusion_test.npy'))
  assert confusion.shape == (4, 4) and confusion.sum() == 8  # the smoke set's 8 test images


def _fake_run(root, name, model, variant, results, history):
  d = os.path.join(root, name)
  os.makedirs(d)
  config = {'model': {'name': model, 'num_classes': 3}, 'variant': variant,
            'data': {'source': 'folder', 'dir': '/data/fake', 'image_size': 32}}
  for fname, obj in (('config.json', config), ('results.json', results)):
    with open(os.path.join(d, fname), 'w') as f:
      json.dump(obj, f)
  with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in history)
  return d


def test_report_table_figures_and_pairs_without_training(tmp_path):
  root = str(tmp_path / 'runs')
  history = [{'epoch': e, 'step': 10 * e, 'images_seen': 320 * e, 'train_accuracy': 0.2 * e,
              'val_accuracy': 0.15 * e} for e in (1, 2, 3)]
  base = {'best_val_accuracy': 0.45, 'test_top5': 1.0, 'test_examples': 9, 'epochs': 3,
          'steps': 30, 'images_seen': 960, 'validations': 3,
          'wall_time_s': 3725.0, 'train_images_per_s': 123.4}
  tcel = _fake_run(root, 'vit_tcel', 'vit_b16', 'tcel',
                   {**base, 'test_accuracy': 0.9, 'test_knn_accuracy': 0.8,
                    'test_recall_at_1': 0.85}, history)
  _fake_run(root, 'vit_strong', 'vit_b16', 'strong', {**base, 'test_accuracy': 0.95,
                                                       'best_val_accuracy': 0.4}, history)
  _fake_run(root, 'r18_pi', 'resnet18', 'deform_after_conv1_pretrained_init',
            {**base, 'test_accuracy': 0.6}, history)
  os.makedirs(os.path.join(root, 'unfinished'))
  with open(os.path.join(root, 'unfinished', 'config.json'), 'w') as f:
    json.dump({'model': {'name': 'resnet18'}}, f)
  np.save(os.path.join(tcel, 'confusion_test.npy'),
          np.array([[3, 0, 0], [2, 1, 0], [0, 1, 2]]))
  with open(os.path.join(tcel, 'class_names.json'), 'w') as f:
    json.dump(['rose', 'lotus', 'daisy'], f)

  out = str(tmp_path / 'out')
  assert report.main([root, '--out', out]) == 0
  text = open(os.path.join(out, 'report.md')).read()
  rows = {x.split(' | ')[1]: x for x in text.splitlines() if x.startswith('| vit_b16 |')
          or x.startswith('| resnet18 |')}
  assert '| 0.900 | 0.876 | +0.024 |' in rows['tcel'] and '| 0.800 | 0.850 |' in rows['tcel']
  assert '0.876 (best: tcel)' in rows['strong'] and '| 1:02:05 | 123.4 |' in rows['strong']
  assert '0.565 (deform_after_conv1)' in rows['deform_after_conv1_pretrained_init']
  # No k-NN / recall@1: blank cells; then steps, images seen, epochs, validations.
  assert '| 1.000 |  |  | 30 | 960 | 3 | 3 |' in rows['strong']
  assert 'unfinished (no results.json): unfinished' in text
  for model in ('vit_b16', 'resnet18'):
    assert os.path.getsize(os.path.join(out, f'curves_{model}.png')) > 10_000
  # ViT's best run by validation accuracy is tcel: its saved confusion, its class names.
  assert '| lotus | rose | 2 of 3 |' in text and '| daisy | lotus | 1 of 3 |' in text
  assert 'ResNet18: deform_after_conv1_pretrained_init' in text and 'not computed' in text


def test_unknown_run_filter_lists_the_runs(tmp_path):
  proc = run_script('--suite', 'beyond', '--smoke', '--out', str(tmp_path), '--only', 'nope')
  assert proc.returncode == 2
  assert 'resnet18_strong' in proc.stderr and 'vit_b16_tcel_hard' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_suites_cover_the_study_and_its_improvements():
  study = {run_experiments.run_name(*r) for r in run_experiments.SUITES['study']}
  assert {'efficientnet_b0_eca', 'vit_b16_tcel', 'resnet18_deform_after_conv1',
          'resnet18_deform_parallel_conv1', 'vit_b16_frozen', 'resnet18_finetune'} <= study
  beyond = {run_experiments.run_name(*r) for r in run_experiments.SUITES['beyond']}
  assert {f'{m}_strong' for m in ('resnet18', 'efficientnet_b0', 'vit_b16')} <= beyond
  assert set(run_experiments.SUITES['all']) == set(run_experiments.SUITES['study']) | set(
      run_experiments.SUITES['beyond'])
