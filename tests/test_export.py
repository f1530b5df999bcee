"""`flowers_jax.export`: each format gives predict's logits back in its own framework.

One demo ResNet18 (configs/demo.py, 3 classes, 32 px) is trained for 2 steps through the real
loop (`train.train_and_evaluate`, ~20 s on 2 cores); its 8 test-set files go through predict's
own eval transform (`predict.eval_batches`) and `Run.logits`, the reference every export must
match to 1e-4: the torchvision state_dict in torch (load_state_dict strict), the SavedModel in
TensorFlow (tf.saved_model.load), the StableHLO artifact through jax.export.deserialize at a
batch size it was not traced at, the safetensors bit for bit.
"""

import glob
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from flowers_jax import config_utils, data, export, predict, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3
NAMES = ['class_000', 'class_001', 'class_002']
TOL = 1e-4


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A demo ResNet18 run on 3 classes x 6 synthetic images at 32 px, trained for 2 steps."""
  root = tmp_path_factory.mktemp('export')
  data_dir, workdir = str(root / 'data'), str(root / 'run')
  data.make_fake_flowers(data_dir, num_classes=NUM_CLASSES, per_class=6, image_size=40,
                         seed=0, splits=(0.5, 0.25))
  c = config_utils.load_config(os.path.join(ROOT, 'configs', 'demo.py'))
  c.model.num_classes = NUM_CLASSES
  c.data.dir = data_dir
  c.data.image_size = 32
  c.train.steps = 2
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.optim.warmup_steps = 0
  train.train_and_evaluate(c, workdir)
  return workdir


def _pixels_and_inputs(run, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 pixels, normalised float32) of an eval batch, whichever of the two
  `predict.eval_batches` yields (uint8 once normalisation moves onto the device)."""
  t = export.eval_transform(run.config)
  mean, std = np.float32(t['mean']), np.float32(t['std'])
  if x.dtype == np.uint8:
    return x, (x.astype(np.float32) / np.float32(255) - mean) / std
  return np.clip(np.round((x * std + mean) * 255), 0, 255).astype(np.uint8), x


@pytest.fixture(scope='module')
def reference(workdir):
  """(uint8 [8, 32, 32, 3], normalised float32 [8, 32, 32, 3], predict's logits [8, 3])."""
  paths = sorted(glob.glob(os.path.join(workdir, '..', 'data', 'jpg', '*.jpg')))[:8]
  run = predict.load_run(workdir)
  split, errors = predict.readable(paths)
  assert not errors and len(split) == 8
  (rows, x), = predict.eval_batches(run.config, split, 8)
  assert list(rows) == list(range(8))
  pixels, inputs = _pixels_and_inputs(run, np.asarray(x))
  logits = run.logits(inputs)
  # Not a constant model: one grey level moves these logits by ~5e-3, a wrong mean ~0.1.
  assert np.ptp(logits, axis=0).max() > 100 * TOL
  return pixels, inputs, logits


def _sidecar(path: str, fmt: str) -> dict:
  """The JSON beside (or inside) an export, checked for what every format carries."""
  with open(export.sidecar_path(path, export.FORMATS[fmt].directory)) as f:
    info = json.load(f)
  assert info['format'] == fmt and info['class_names'] == NAMES
  assert info['model']['name'] == 'resnet18' and info['model']['num_classes'] == NUM_CLASSES
  assert info['run']['checkpoint'] == 'best' and info['run']['step'] is not None
  t = info['transform']
  assert (t['image_size'], t['eval_resize'], t['interpolation']) == (32, 37, 'bilinear')
  assert t['mean'] == pytest.approx([0.485, 0.456, 0.406])
  assert t['std'] == pytest.approx([0.229, 0.224, 0.225])
  return info


def _max_diff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max())


def test_stablehlo_round_trip_at_other_batch_sizes(workdir, reference, tmp_path):
  import jax
  pixels, _, logits = reference
  out = str(tmp_path / 'model.stablehlo')
  assert export.main(['--workdir', workdir, '--format', 'stablehlo', '--out', out]) == 0
  info = _sidecar(out, 'stablehlo')
  assert info['inputs']['call']['dtype'] == 'uint8' and 'cpu' in info['platforms']
  with open(out, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert str(exported.in_avals[0].shape[0]) == 'b'  # traced once, for any batch size
  for n in (8, 3):
    assert _max_diff(exported.call(pixels[:n]), logits[:n]) <= TOL


def test_savedmodel_round_trip_both_signatures(workdir, reference, tmp_path):
  from flowers_jax.data import tf_import
  tf = tf_import.import_tf()
  pixels, inputs, logits = reference
  out = str(tmp_path / 'saved')
  export.export(workdir, 'savedmodel', out)
  info = _sidecar(out, 'savedmodel')
  assert os.path.isfile(os.path.join(out, export.SIDECAR_NAME))
  assert set(info['inputs']) == {'serving_default', 'normalized'}
  loaded = tf.saved_model.load(out)
  got = loaded.signatures['serving_default'](images=tf.constant(pixels))
  assert _max_diff(got['logits'], logits) <= TOL
  assert np.allclose(got['probabilities'].numpy().sum(-1), 1, atol=1e-5)
  got = loaded.signatures['normalized'](images=tf.constant(inputs[:3]))
  assert _max_diff(got['logits'], logits[:3]) <= TOL
  # Any batch size: 11 images are two chunks of export.SAVEDMODEL_CHUNK, the last one padded.
  eleven = np.concatenate([pixels, pixels[:3]])
  got = loaded.signatures['serving_default'](images=tf.constant(eleven))
  assert got['logits'].shape[0] == 11 > export.SAVEDMODEL_CHUNK
  assert _max_diff(got['logits'], np.concatenate([logits, logits[:3]])) <= TOL


def test_torchvision_round_trip_strict(workdir, reference, tmp_path):
  import torch
  import torchvision
  _, inputs, logits = reference
  out = str(tmp_path / 'model.pth')
  export.export(workdir, 'torchvision', out)
  info = _sidecar(out, 'torchvision')
  net = torchvision.models.get_model(info['model']['torchvision'], num_classes=NUM_CLASSES,
                                     **info['model']['torchvision_kwargs'])
  net.load_state_dict(torch.load(out, weights_only=True), strict=True)
  with torch.no_grad():
    got = net.eval()(torch.from_numpy(inputs).permute(0, 3, 1, 2)).numpy()
  assert _max_diff(got, logits) <= TOL


def test_safetensors_reload_bit_for_bit(workdir, tmp_path):
  import flax
  out = str(tmp_path / 'model.safetensors')
  export.export(workdir, 'safetensors', out)
  info = _sidecar(out, 'safetensors')
  variables, metadata = export.read_safetensors(out)
  want = flax.traverse_util.flatten_dict(predict.load_run(workdir).variables, sep='/')
  got = flax.traverse_util.flatten_dict(variables, sep='/')
  assert 'params/layer1/0/conv1/kernel' in got and 'batch_stats/bn1/mean' in got
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    v = np.asarray(v)
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
  assert (metadata['model'], metadata['num_classes']) == ('resnet18', str(NUM_CLASSES))
  assert json.loads(metadata['flowers_jax']) == info


def test_eval_transform_of_an_older_run_is_imagenets():
  c = config_utils.load_config(os.path.join(ROOT, 'configs', 'demo.py'))
  old = c.to_dict()
  del old['data']['mean'], old['data']['std']
  t = export.eval_transform(ml_collections.ConfigDict(old))
  assert t['mean'] == pytest.approx([0.485, 0.456, 0.406]) and 'predates' in t['mean_std_from']
  c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  t = export.eval_transform(c)
  assert (t['mean'], t['std']) == ([0.5] * 3, [0.25] * 3)
  assert t['mean_std_from'] == "the run's data.mean / data.std"


def test_torchvision_refuses_variants_it_lacks():
  c = config_utils.load_config(os.path.join(ROOT, 'configs', 'demo.py'))
  assert export.torchvision_refusal(c) is None
  c.model.deform = 'after_conv1'
  why = export.torchvision_refusal(c)
  assert 'model.deform=' in why and 'resnet18' in why and '\n' not in why
  e = config_utils.load_config(os.path.join(ROOT, 'configs', 'efficientnet_b0.py'))
  e.model.attention = 'eca'
  assert 'model.attention=' in export.torchvision_refusal(e)


def _error(capsys, argv) -> str:
  assert export.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


def test_refused_variant_is_one_line_before_restoring(workdir, tmp_path, capsys):
  run = tmp_path / 'deform_run'
  run.mkdir()  # config.json alone: the refusal comes before any checkpoint is read
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['model']['deform'] = 'after_conv1'
  (run / 'config.json').write_text(json.dumps(config))
  err = _error(capsys, ['--workdir', str(run), '--format', 'torchvision',
                        '--out', str(tmp_path / 'x.pth')])
  assert 'model.deform=' in err


def test_user_errors_are_one_line(workdir, tmp_path, capsys):
  out = str(tmp_path / 'x.safetensors')
  args = ['--workdir', workdir, '--out', out]
  assert 'does not exist' in _error(capsys, ['--workdir', str(tmp_path / 'nope'), '--format',
                                             'stablehlo', '--out', out])
  err = _error(capsys, args + ['--format', 'onnx'])
  assert all(f in err for f in export.FORMATS)
  assert 'valid ones' in _error(capsys, args + ['--format', 'stablehlo', '--platforms', 'gpu'])
  (tmp_path / 'x.safetensors').write_bytes(b'old')
  assert 'exists' in _error(capsys, args + ['--format', 'safetensors'])
  assert export.main(args + ['--format', 'safetensors', '--force']) == 0
  assert export.read_safetensors(out)[1]['model'] == 'resnet18'
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.export-')]  # staging removed
  mine = tmp_path / 'my_models'
  mine.mkdir()
  assert 'no export' in _error(capsys, ['--workdir', workdir, '--format', 'savedmodel',
                                        '--out', str(mine), '--force'])
  shutil.rmtree(mine)
