"""`python -m flowers_jax.main`: one-line errors, --help, and a run that learns a 10-class set.

Every case is a subprocess from the repo root, as a user would type it, with one CPU device
and tensorflow's default logging (the 4 fake devices and TF_CPP_MIN_LOG_LEVEL of conftest.py
are removed from its environment).
"""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flowers_jax import config_utils, data, normalization, train
from flowers_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET18 = config_utils.load_module(os.path.join(ROOT, 'configs', 'resnet18.py'))


def run_cli(*args: str, timeout: int = 300,
            entry: tuple[str, ...] = ('-m', 'flowers_jax.main')) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL')}
  return subprocess.run([sys.executable, *entry, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  """The single stderr line of a failed run (fails if there are more, e.g. log lines)."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  lines = proc.stderr.strip('\n').splitlines()
  assert len(lines) == 1, f'expected one line on stderr, got {len(lines)}:\n{proc.stderr}'
  assert lines[0].startswith('error: '), lines[0]
  return lines[0]


def tiny_run_args(workdir, data_dir, epochs: int = 2) -> tuple[str, ...]:
  """The demo config on a 3-class set of 16 px images (`data.make_fake_flowers(...,
  num_classes=3, per_class=4, image_size=16)`), batch 4: a whole run in seconds."""
  return ('--config', 'configs/demo.py', '--workdir', str(workdir),
          f'--config.data.dir={data_dir}', '--config.model.num_classes=3',
          '--config.data.image_size=16', f'--config.train.epochs={epochs}',
          '--config.train.batch_size=4', '--config.train.eval_batch_size=4',
          '--config.optim.warmup_steps=0')


@pytest.fixture(scope='module')
def three_classes(tmp_path_factory):
  d = tmp_path_factory.mktemp('three_classes')
  data.make_fake_flowers(str(d), num_classes=3, per_class=4, image_size=16, seed=0)
  return str(d)


def test_unknown_variant_lists_the_valid_ones(tmp_path):
  line = one_error_line(run_cli('--config', 'configs/resnet18.py:nope',
                                '--workdir', str(tmp_path / 'w')))
  assert "'nope'" in line
  for variant in RESNET18.VARIANTS:
    assert variant in line, variant


def test_unknown_arg_value_lists_the_valid_ones(tmp_path):
  line = one_error_line(run_cli('--config', 'configs/resnet18.py:deform=sideways',
                                '--workdir', str(tmp_path / 'w')))
  assert "'sideways'" in line
  for deform in RESNET18.ARGS['deform']:
    assert deform in line, deform


def test_args_pass_the_config_flag(tmp_path):
  """`FILE.py:name=value,...` goes through absl's config flag: the run gets as far as
  `config_checks.validate`, which names the bad override."""
  spec = 'configs/resnet18.py:deform=parallel_conv1,init=pretrained'
  line = one_error_line(run_cli('--config', spec, '--workdir', str(tmp_path / 'w'),
                                '--config.optim.lr=-1'))
  assert '--config.optim.lr=-1' in line and 'expected' in line, line


def test_unknown_config_file_lists_the_files(tmp_path):
  line = one_error_line(run_cli('--config', 'configs/resnet81.py', '--workdir', str(tmp_path)))
  assert 'resnet81.py' in line and 'resnet18.py' in line and 'demo.py' in line


def test_unknown_key_suggests_and_lists_the_valid_keys(tmp_path):
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(tmp_path),
                                '--config.train.epocs=1'))
  assert "'train.epocs'" in line and "did you mean 'epochs'" in line
  for key in base_config().train:
    assert key in line, key


def test_missing_workdir(tmp_path):
  line = one_error_line(run_cli('--config', 'configs/demo.py'))
  assert '--workdir' in line


def test_missing_data_dir(tmp_path):
  missing = str(tmp_path / 'no_such_dir')
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
                                f'--config.data.dir={missing}'))
  assert missing in line and 'does not exist' in line


def test_num_classes_mismatch_says_what_to_set(tmp_path, three_classes):
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
                                f'--config.data.dir={three_classes}',
                                '--config.model.num_classes=5'))
  assert '--config.model.num_classes=3' in line


def _image_folder(root, splits=('train', 'val', 'test'), classes=('a', 'b', 'c'), empty=()):
  """DIR/<split>/<class>/*.jpg, 3 images per class; the classes in `empty` get none."""
  from PIL import Image
  for split in splits:
    for c, name in enumerate(classes):
      (root / split / name).mkdir(parents=True)
      for i in range(0 if name in empty else 3):
        img = data.fake.render(c, 3, 20, 20, np.random.default_rng([c, i]))
        Image.fromarray(img).save(root / split / name / f'{i}.jpg')
  return root


@pytest.mark.parametrize('splits,missing', [(('train', 'val'), 'no test split'),
                                            (('train', 'test'), 'no validation split'),
                                            (('train',), 'no validation and no test split')])
def test_imagefolder_without_a_split_the_run_reads_stops_before_anything(tmp_path, splits,
                                                                         missing):
  """Found after the compile and a whole epoch before (Unknown split 'validation')."""
  folder = _image_folder(tmp_path / 'imgs', splits)
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
                                '--config.data.source=imagefolder', f'--config.data.dir={folder}',
                                '--config.model.num_classes=3', timeout=60))
  assert missing in line and 'DIR/validation (or DIR/val) and DIR/test' in line, line
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_a_class_without_train_images_is_one_line(tmp_path):
  folder = _image_folder(tmp_path / 'imgs', empty=('b',))
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
                                '--config.data.source=imagefolder', f'--config.data.dir={folder}',
                                '--config.model.num_classes=3', timeout=60))
  assert "1 of 3 classes have no train image ('b')" in line, line


def test_help():
  proc = run_cli('--help')
  assert proc.returncode in (0, 1), proc.stderr  # absl's --help exits with 1
  assert proc.stderr == ''
  usage = proc.stdout
  assert 'configs/resnet18.py:finetune' in usage  # the module docstring's example
  assert '--config:' in usage and '--workdir:' in usage


def test_learns_a_generated_ten_class_set(tmp_path):
  """Random-init ResNet18, 24x24 crops, 24 train images per class, 6 epochs of 15 steps.

  Measured: test accuracy 0.86 (chance 0.1) in about 70 s on 2 CPU cores.
  """
  data_dir, workdir = str(tmp_path / 'flowers'), str(tmp_path / 'run')
  sizes = data.make_fake_flowers(data_dir, num_classes=10, per_class=40, image_size=40, seed=0,
                                 splits=(0.6, 0.2))
  assert sizes == {'train': 240, 'validation': 80, 'test': 80}
  proc = run_cli('--config', 'configs/demo.py', '--workdir', workdir,
                 '--config.data.source=folder', f'--config.data.dir={data_dir}',
                 '--config.model.num_classes=10', '--config.data.image_size=24',
                 '--config.data.pp_train=flip', '--config.train.batch_size=16',
                 '--config.train.epochs=6', timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Only the project's lines: TensorFlow's import banners (oneDNN, absl's InitializeLog
  # notice) were printed twice on stderr before (data/tf_import.py).
  assert proc.stderr.strip() == '', proc.stderr
  assert proc.stdout.splitlines()[0].startswith('90 steps of 16 images = 6 epochs of 15 steps')
  assert proc.stdout.splitlines()[1].startswith('model resnet18: '), proc.stdout[:500]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  print(f"test accuracy {results['test_accuracy']:.3f} (best epoch {results['best_epoch']}), "
        f"wall {results['wall_time_s']:.0f}s")
  assert len(rows) == 6 and results['test_examples'] == 80
  assert results['test_accuracy'] > 0.5
  assert rows[-1]['train_accuracy'] > rows[0]['train_accuracy'] + 0.2


def test_starts_from_torchvision_weights(tmp_path, three_classes):
  """`init.torchvision=FILE.pth` through the CLI: the report names what was loaded/initialised,
  and the pretrained-init deformable variant starts from them and trains."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  pth = tmp_path / 'resnet18.pth'
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), pth)
  proc = run_cli('--config', 'configs/resnet18.py:deform_parallel_conv1_pretrained_init',
                 '--workdir', str(tmp_path / 'w'), f'--config.data.dir={three_classes}',
                 '--config.model.num_classes=3', f'--config.init.torchvision={pth}',
                 '--config.data.image_size=32', '--config.train.epochs=1',
                 '--config.train.batch_size=4', '--config.train.eval_batch_size=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'loaded 100 torchvision tensors' in proc.stdout
  assert 'params/deform_parallel_conv1/kernel' in proc.stdout  # newly initialised
  assert 'dropped 2 torch keys [fc.weight, fc.bias]' in proc.stdout
  results = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert results['epochs'] == 1
  assert results['test_accuracy'] == pytest.approx(best_test_accuracy(tmp_path / 'w'), abs=1e-9)


def best_test_accuracy(workdir) -> float:
  """Test accuracy of a run's best checkpoint, computed here: `model.apply`, argmax, labels.

  Reads workdir/config.json and the raw orbax tree of checkpoints/best/<step>/state."""
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  with ocp.CheckpointManager(workdir / 'checkpoints' / 'best') as manager:
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  ds = data.build(config.data, seed=config.seed)
  batch = next(ds.eval_batches('test', ds.num_examples['test']))
  logits, _ = train.create_model(config).apply(
      {'params': state['params'], 'batch_stats': state['batch_stats']},
      normalization.normalize(batch['image'], config.data.mean, config.data.std),
      train=False)  # (logits [B, C], {'pre_logits': [B, D]})
  return float((np.argmax(np.asarray(logits), -1) == batch['label']).mean())


@pytest.mark.parametrize('override,names', [
    ('--config.data.image_size=0', 'data.image_size'),
    ('--config.optim.lr=-1', 'optim.lr'),
    ('--config.train.label_smoothing=2.0', 'train.label_smoothing'),
    ('--config.train.freeze=', 'train.freeze'),
    ('--config.train.batchnorm=frozen', 'train.batchnorm'),
])
def test_bad_value_is_one_line_naming_the_key(tmp_path, three_classes, override, names):
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
                                f'--config.data.dir={three_classes}',
                                '--config.model.num_classes=3', override, timeout=60))
  assert f'--config.{names}=' in line and 'expected' in line, line


def test_weights_that_are_not_a_torch_file(tmp_path, three_classes):
  mat = os.path.join(three_classes, 'imagelabels.mat')
  line = one_error_line(run_cli('--config', 'configs/resnet18.py:finetune',
                                '--workdir', str(tmp_path / 'w'),
                                f'--config.data.dir={three_classes}',
                                '--config.model.num_classes=3', f'--config.init.torchvision={mat}',
                                '--config.data.image_size=32', timeout=60))
  assert 'imagelabels.mat' in line and '.pth' in line, line


def test_too_little_disk_is_one_line_before_training(tmp_path, three_classes):
  """The CLI's main with `checkpoint.free_bytes` patched to 1 MiB (a test has no small disk)."""
  entry = ('-c', 'from flowers_jax import checkpoint, main; '
           'checkpoint.free_bytes = lambda path: 2**20; main.run()')
  workdir = tmp_path / 'w'
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(workdir),
                                f'--config.data.dir={three_classes}',
                                '--config.model.num_classes=3', '--config.train.batch_size=4',
                                '--config.train.eval_batch_size=4', '--config.optim.warmup_steps=0',
                                entry=entry, timeout=120))
  assert 'not enough disk' in line and '1.0 MiB are free' in line, line
  assert not os.listdir(workdir / 'checkpoints' / 'latest')


def test_tfds_without_network_says_so_at_once(tmp_path):
  """No prepared oxford_flowers102 and no route to its host: one line within the timeout,
  naming the raw-files alternative (TFDS itself would retry the download for minutes)."""
  line = one_error_line(run_cli('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
                                '--config.data.source=tfds', f'--config.data.dir={tmp_path}',
                                timeout=60))
  assert 'cannot reach' in line and 'data.source=folder' in line, line
