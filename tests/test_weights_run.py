"""A CLI run from a timm ViT-B/16 augreg directory (`save_for_hf`): it trains, and its config.json
records the weights' own preprocessing (mean = std = 0.5, bicubic, crop 0.9), not ImageNet's."""

import json
import math
import os

import numpy as np
import pytest

from flowers_jax import data
from test_cli import run_cli

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
from timm.models._hub import save_for_hf  # noqa: E402  (after the importorskip)

SIZE = 32


@pytest.fixture(scope='module')
def augreg_dir(tmp_path_factory):
  """timm's `vit_base_patch16_224.augreg_in21k` (random weights, its 21843-class head and the
  tag's pretrained_cfg), written as the Hugging Face layout."""
  torch.manual_seed(0)
  model = timm.create_model('vit_base_patch16_224.augreg_in21k', pretrained=False)
  path = tmp_path_factory.mktemp('augreg') / 'vit_base_patch16_224.augreg_in21k'
  save_for_hf(model, str(path), safe_serialization=True)
  return path


def test_cli_run_from_a_timm_augreg_directory_uses_its_preprocessing(augreg_dir, tmp_path):
  with open(augreg_dir / 'config.json') as f:
    pretrained = json.load(f)['pretrained_cfg']
  assert pretrained['mean'] == pretrained['std'] == [0.5, 0.5, 0.5]
  data_dir = tmp_path / 'data'
  data.make_fake_flowers(str(data_dir), num_classes=3, per_class=4, image_size=40, seed=0)
  workdir = tmp_path / 'run'
  proc = run_cli('--config', 'configs/vit_b16.py:finetune', '--workdir', str(workdir),
                 f'--config.data.dir={data_dir}', '--config.model.num_classes=3',
                 f'--config.data.image_size={SIZE}', f'--config.init.weights=timm:{augreg_dir}',
                 '--config.train.steps=2', '--config.train.batch_size=4',
                 '--config.train.eval_batch_size=4', '--config.optim.warmup_steps=0',
                 '--config.evals.names=classification', '--config.train.checkpoint=False',
                 timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'preprocessing from' in proc.stdout and 'bicubic' in proc.stdout, proc.stdout[:2000]
  # The 21843-class head is dropped and a 3-class one initialised; the backbone loads whole.
  assert 'dropped' in proc.stdout and 'head' in proc.stdout, proc.stdout[:2000]
  with open(workdir / 'config.json') as f:
    saved = json.load(f)['data']
  assert saved['mean'] == saved['std'] == [0.5, 0.5, 0.5]
  assert saved['interpolation'] == pretrained['interpolation'] == 'bicubic'
  assert saved['eval_resize'] == math.floor(SIZE / pretrained['crop_pct']) == 35
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert results['steps'] == 2 and np.isfinite(results['test_loss'])
  assert os.path.isfile(workdir / 'metrics.jsonl')


def test_explicit_config_values_win_over_the_weights(augreg_dir, tmp_path):
  """`resolve_preprocessing` fills only what the config leaves at auto, and says what it kept."""
  from flowers_jax import train
  from flowers_jax.config_utils import load_module
  config = load_module('configs/vit_b16.py').get_config('finetune')
  config.init.weights = f'timm:{augreg_dir}'
  config.data.mean = (0.485, 0.456, 0.406)
  said = train.resolve_preprocessing(config)
  assert config.data.mean == (0.485, 0.456, 0.406) and config.data.std == (0.5, 0.5, 0.5)
  assert config.data.interpolation == 'bicubic' and config.data.eval_resize == 248
  assert "kept the config's data.mean" in said, said
  plain = load_module('configs/vit_b16.py').get_config('finetune')
  assert train.resolve_preprocessing(plain) is None  # random init: ImageNet's, bilinear
  assert plain.data.mean == (0.485, 0.456, 0.406) and plain.data.interpolation == 'bilinear'
  assert plain.data.eval_resize == 0


def test_a_bare_timm_file_takes_timm_s_registry_default(tmp_path):
  """`timm:FILE` with no config.json: the architecture is the model's default timm one, and so is
  the preprocessing (its default tag's pretrained_cfg), said where it came from."""
  from safetensors.torch import save_file
  from flowers_jax import train
  from flowers_jax.config_utils import load_module
  torch.manual_seed(0)
  path = tmp_path / 'r18.safetensors'
  save_file(timm.create_model('resnet18', pretrained=False).state_dict(), str(path))
  config = load_module('configs/resnet18.py').get_config('finetune')
  config.init.weights = f'timm:{path}'
  said = train.resolve_preprocessing(config)
  default = timm.models.get_pretrained_cfg('resnet18')  # the default tag's
  assert config.data.mean == tuple(default.mean) and config.data.std == tuple(default.std)
  assert config.data.interpolation == default.interpolation
  assert config.data.eval_resize == math.floor(224 / default.crop_pct)
  assert "registry default for resnet18" in said and 'no config.json' in said, said
