"""Weights from timm / safetensors / Hugging Face directories (`flowers_jax/weights.py`,
`convert.load_weights`).

Parity: timm models with random weights (every parameter perturbed, BatchNorm running statistics
random) written by timm's own `save_for_hf(model, DIR, safe_serialization=True)`, loaded through
`convert.load_weights`, give timm's eval-mode logits within TOL at odd image sizes. The ViTs are
built by timm with `depth=` 1-2 blocks at their real width; our registered ViT is swapped for
one of that depth (`shallow_vits`), since the registered factories fix torchvision's depth.
Then the spec forms (bare files, .pth, the Hugging Face cache), the refusals (one line each) and
the preprocessing read from timm's config.
"""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tree_util import flat
from flowers_jax import convert, models, weights
from flowers_jax.models import registry

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
from timm.models._hub import save_for_hf  # noqa: E402  (after the importorskip)

TOL = 1e-4
VIT_DEPTH = {'vit_b16': 2, 'vit_b32': 1, 'vit_l16': 1}


def _perturbed(arch, **kwargs):
  """timm `arch` (random init), parameters + N(0, 0.05^2), BatchNorm stats random; eval mode."""
  from torch_util import perturbed
  return perturbed(lambda: timm.create_model(arch, pretrained=False, **kwargs))


def _save(model, path):
  save_for_hf(model, str(path), safe_serialization=True)
  return str(path)


def _timm_logits(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
  return model.apply(variables, x)


def _max_diff(name, variables, timm_model, size, **options):
  x = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
  logits, _ = _apply(models.create(name, num_classes=timm_model.num_classes, **options),
                     variables, x)
  want = _timm_logits(timm_model, x)
  diff = float(np.abs(np.asarray(logits) - want).max())
  print(f'{name} at {size} px: logits max abs diff {diff:.2e} (max abs {np.abs(want).max():.2f})')
  return diff


def _shallow(factory, depth):
  @functools.wraps(factory)  # same signature, so the same options
  def build(*args, **kwargs):
    return factory(*args, **kwargs).clone(num_layers=depth)
  return build


@pytest.fixture(scope='module')
def shallow_vits():
  """The registered ViTs with `VIT_DEPTH` blocks (torchvision's widths, heads, patch sizes)."""
  with pytest.MonkeyPatch.context() as mp:
    for name, depth in VIT_DEPTH.items():
      spec = models.spec(name)
      mp.setitem(registry._MODELS, name,
                 dataclasses.replace(spec, factory=_shallow(spec.factory, depth)))
    yield


def one_line(error) -> str:
  message = str(error.value)
  assert message and '\n' not in message, message
  return message


@pytest.fixture(scope='module')
def resnet18(tmp_path_factory):
  """(timm model, its save_for_hf directory)."""
  model = _perturbed('resnet18')
  return model, _save(model, tmp_path_factory.mktemp('timm') / 'resnet18')


# --- parity ----------------------------------------------------------------------------------

def test_resnet18_matches_timm_from_every_file_form(resnet18, tmp_path):
  model, directory = resnet18
  variables, report = convert.load_weights('resnet18', f'timm:{directory}')
  assert len(report.loaded) == 102 and not report.dropped and not report.initialised
  assert 'Read timm weights' in report.summary() and 'bicubic' in report.summary()
  assert _max_diff('resnet18', variables, model, 72) < TOL
  sd = model.state_dict()
  torch.save(sd, tmp_path / 'resnet18.pth')
  shutil.copy(os.path.join(directory, 'model.safetensors'), tmp_path / 'resnet18.safetensors')
  for spec, fmt in [(tmp_path / 'resnet18.safetensors', 'torchvision'),  # keys are torchvision's
                    (f'timm:{tmp_path / "resnet18.safetensors"}', 'timm'),
                    (tmp_path / 'resnet18.pth', 'torchvision'),
                    (f'timm:{tmp_path / "resnet18.pth"}', 'timm'),
                    (f'torchvision:{tmp_path / "resnet18.pth"}', 'torchvision'),
                    (save_for_hf(model, str(tmp_path / 'bin')) or str(tmp_path / 'bin'), 'timm'),
                    (directory, 'timm')]:
    again, report = convert.load_weights('resnet18', spec, num_classes=1000)
    assert report.source.startswith(f'{fmt} weights'), (spec, report.source)
    # timm weights carry a preprocessing: their config.json's, else timm's registry default.
    assert (report.preprocessing is not None) == (fmt == 'timm'), report.source
    if fmt == 'timm' and 'config.json' not in report.source:
      assert 'registry default for resnet18' in report.preprocessing['source']
    for path, value in flat(variables).items():
      np.testing.assert_array_equal(flat(again)[path], value, err_msg=f'{spec} {path}')


def test_efficientnet_b0_matches_timm(tmp_path):
  model = _perturbed('efficientnet_b0')
  variables, report = convert.load_weights('efficientnet_b0', _save(model, tmp_path / 'e'))
  assert len(report.loaded) == 311 and not report.dropped and not report.initialised
  assert 'blocks.0.0.se.conv_reduce.weight' in report.loaded  # timm's names in the report
  assert _max_diff('efficientnet_b0', variables, model, 80) < TOL


@pytest.mark.parametrize('name, arch, size', [('vit_b16', 'vit_base_patch16_224', 48),
                                              ('vit_b32', 'vit_base_patch32_224', 96),
                                              ('vit_l16', 'vit_large_patch16_224', 48)])
def test_vit_matches_timm(shallow_vits, name, arch, size, tmp_path):
  model = _perturbed(arch, depth=VIT_DEPTH[name], img_size=size)
  variables, report = convert.load_weights(name, f'timm:{_save(model, tmp_path / "v")}',
                                           image_size=size)
  assert len(report.loaded) == 8 + 12 * VIT_DEPTH[name]
  assert not report.dropped and not report.initialised
  assert _max_diff(name, variables, model, size, image_size=size) < TOL
  if name == 'vit_b32':  # a state_dict in memory, timm keys recognised
    same, report = convert.load_weights(name, model.state_dict(), image_size=size)
    assert report.source == 'timm weights given as a state_dict' and report.preprocessing is None
    for path, value in flat(variables).items():
      np.testing.assert_array_equal(flat(same)[path], value, err_msg=path)


def test_vit_at_another_size_matches_timms_own_resampling(shallow_vits, tmp_path):
  """48 px weights into an 80 px model = timm's model built at 80 px loading them
  (`checkpoint_filter_fn`: antialiased bicubic); torchvision's resize would differ."""
  small = _perturbed('vit_base_patch16_224', depth=2, img_size=48)
  big = timm.create_model('vit_base_patch16_224', pretrained=False, depth=2, img_size=80)
  vit_module = sys.modules[type(big).__module__]
  big.load_state_dict(vit_module.checkpoint_filter_fn(small.state_dict(), big))
  variables, _ = convert.load_weights('vit_b16', _save(small, tmp_path / 'v'), image_size=80)
  assert _max_diff('vit_b16', variables, big.eval(), 80, image_size=80) < TOL
  pos = small.pos_embed.detach().numpy()
  torchvision_way = models.vit.resize_pos_embedding(pos, (1, 26, 768))
  print('torchvision vs timm pos_embed resize, max abs diff: '
        f'{np.abs(torchvision_way - weights.resize_pos_embed_timm(pos, (1, 26, 768))).max():.2e}')


@pytest.mark.parametrize('grid_in, grid_out', [(3, 5), (14, 24), (24, 14), (7, 2)])
def test_pos_embed_resize_is_timms(grid_in, grid_out):
  from timm.layers import resample_abs_pos_embed
  pos = np.random.RandomState(0).randn(1, 1 + grid_in ** 2, 8).astype(np.float32)
  want = resample_abs_pos_embed(torch.from_numpy(pos), [grid_out, grid_out]).numpy()
  got = weights.resize_pos_embed_timm(pos, (1, 1 + grid_out ** 2, 8))
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])


def test_in21k_head_dropped_and_augreg_preprocessing(shallow_vits, tmp_path):
  model = _perturbed('vit_base_patch16_224.augreg_in21k', depth=2, img_size=48)
  assert model.num_classes == 21843
  directory = _save(model, tmp_path / 'augreg')
  pre = weights.preprocessing('vit_b16', f'timm:{directory}')
  assert pre['mean'] == pre['std'] == (0.5, 0.5, 0.5)
  assert pre['interpolation'] == 'bicubic' and pre['crop_pct'] == 0.9
  assert pre['input_size'] == (3, 48, 48) and 'config.json' in pre['source']
  variables, report = convert.load_weights('vit_b16', directory, num_classes=10, image_size=48)
  assert sorted(report.dropped) == ['head.bias', 'head.weight']
  assert sorted(report.initialised) == ['params/heads/head/bias', 'params/heads/head/kernel']
  assert report.preprocessing == pre and 'crop_pct 0.9' in report.summary()
  x = np.random.RandomState(0).randn(2, 48, 48, 3).astype(np.float32)
  _, out = _apply(models.create('vit_b16', num_classes=10, image_size=48), variables, x)
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    want = model.forward_head(tokens, pre_logits=True).numpy()
  assert np.abs(np.asarray(out['pre_logits']) - want).max() < TOL


# --- the Hugging Face cache ------------------------------------------------------------------

@contextlib.contextmanager
def _hf_cache(monkeypatch, tmp_path):
  cache = tmp_path / 'hf' / 'hub'
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  yield cache


def _plant(cache, name, directory, commit='0123456789abcdef'):
  """The Hub cache layout: models--timm--NAME/{refs/main, snapshots/COMMIT/<files>}."""
  repo = cache / f'models--timm--{name}'
  shutil.copytree(directory, repo / 'snapshots' / commit)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)


def test_timm_name_from_the_cache(resnet18, monkeypatch, tmp_path):
  model, directory = resnet18
  with _hf_cache(monkeypatch, tmp_path) as cache:
    spec = 'timm:resnet18.a1_in1k'
    assert weights.preprocessing('resnet18', spec) is None  # not cached: nothing known yet
    with pytest.raises(FileNotFoundError) as error:
      convert.load_weights('resnet18', spec)
    message = one_line(error)
    for words in (str(cache), 'HF_HUB_OFFLINE', 'huggingface-cli download timm/resnet18.a1_in1k',
                  'save_for_hf', 'timm:DIR'):
      assert words in message, words
    _plant(cache, 'resnet18.a1_in1k', directory)
    direct, _ = convert.load_weights('resnet18', f'timm:{directory}')
    for spec in ('timm:resnet18.a1_in1k', 'timm:resnet18', 'timm:hf-hub:timm/resnet18.a1_in1k'):
      variables, report = convert.load_weights('resnet18', spec)
      assert str(cache) in report.source and report.preprocessing['crop_pct'] == 0.95
      np.testing.assert_array_equal(variables['params']['layer4']['1']['conv2']['kernel'],
                                    direct['params']['layer4']['1']['conv2']['kernel'])
    bare = tmp_path / 'bare.safetensors'
    shutil.copy(os.path.join(directory, 'model.safetensors'), bare)
    assert weights.preprocessing('resnet18', f'timm:resnet18.a1_in1k:{bare}')['crop_pct'] == 0.95
    assert weights.preprocessing('resnet18', bare) is None
    assert weights.preprocessing('resnet18', spec)['source'].startswith("timm's pretrained_cfg")
    registry_entry = weights.preprocessing('vit_b16', f'timm:vit_base_patch16_224.augreg_in21k:'
                                           f'{bare}')  # not cached: timm's registry
    assert registry_entry['mean'] == (0.5, 0.5, 0.5) and 'registry' in registry_entry['source']
    _plant(cache, 'resnet18.tv_in1k', directory)
    with pytest.raises(ValueError, match='ambiguous.*resnet18.a1_in1k, resnet18.tv_in1k'):
      convert.load_weights('resnet18', 'timm:resnet18')


def test_preprocessing_reads_json_only(resnet18, tmp_path):
  """No torch import, and None for torchvision weights."""
  _, directory = resnet18
  code = ('import sys; from flowers_jax import weights; '
          f'p = weights.preprocessing("resnet18", "timm:{directory}"); '
          'assert p["crop_pct"] == 0.95 and p["interpolation"] == "bicubic", p; '
          'assert "torch" not in sys.modules, "torch imported"')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  pth = tmp_path / 'tv.pth'
  pth.write_bytes(b'')
  assert weights.preprocessing('resnet18', pth) is None
  assert weights.preprocessing('resnet18', f'torchvision:{pth}') is None


# --- refusals: one line each -----------------------------------------------------------------

def _vit(tmp_path, **kwargs):
  return _save(_perturbed('vit_base_patch16_224', depth=1, img_size=32, **kwargs), tmp_path / 'v')


def _bare(tmp_path, directory):
  shutil.copy(os.path.join(directory, 'model.safetensors'), tmp_path / 'bare.safetensors')
  return str(tmp_path / 'bare.safetensors')


def _edit_config(directory, **changes):
  path = os.path.join(directory, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, 'w') as f:
    json.dump(config, f)
  return directory


def _extra_key(tmp_path, resnet18):
  from safetensors.torch import save_file
  sd = dict(resnet18[0].state_dict(), **{'layer1.0.extra.weight': torch.zeros(3)})
  save_file(sd, tmp_path / 'extra.safetensors')
  return f'timm:{tmp_path / "extra.safetensors"}'


REFUSALS = {  # case -> (model, spec builder(tmp_path, resnet18), error, words in the message)
    'fc_norm': ('vit_b16', lambda t, r: _vit(t, global_pool='avg', fc_norm=True), ValueError,
                ['refused', 'fc_norm', "global_pool='avg'", 'vit_b_16']),
    'fc_norm_keys_only': (
        'vit_b16', lambda t, r: _bare(t, _vit(t, global_pool='avg', fc_norm=True)),
        ValueError, ['keys show fc_norm']),
    'register_tokens': ('vit_b16', lambda t, r: _vit(t, reg_tokens=4), ValueError,
                        ['register tokens']),
    'no_qkv_bias': ('vit_b16', lambda t, r: _vit(t, qkv_bias=False), ValueError,
                    ['qkv_bias=False']),
    'layer_scale': ('vit_b16', lambda t, r: _vit(t, init_values=1e-5), ValueError,
                    ['layer scale']),
    'no_class_token_keys_only': (
        'vit_b16',
        lambda t, r: _bare(t, _vit(t, class_token=False, global_pool='avg', fc_norm=False)),
        ValueError, ['no class token']),
    'tf_efficientnet': ('efficientnet_b0', lambda t, r: _save(_perturbed('tf_efficientnet_b0'),
                                                               t / 'tf'),
                        ValueError, ["'tf_efficientnet_b0' is refused", "'same' padding"]),
    'deep_stem': ('resnet18', lambda t, r: _save(_perturbed('resnet18d'), t / 'd'), ValueError,
                  ["'resnet18d' is refused", 'deep stem']),
    'architecture_mismatch': ('resnet18', lambda t, r: _save(_perturbed('resnet34'), t / 'r'),
                              ValueError, ['resnet34 weights are for model resnet34',
                                           'trained is resnet18']),
    'other_family_keys': ('vit_b16', lambda t, r: f'timm:{_bare(t, r[1])}', ValueError,
                          ['look like timm ResNet weights', 'vit_base_patch16_224']),
    'unknown_key': ('resnet18', _extra_key, ValueError,
                    ['1 timm keys that no row', 'layer1.0.extra.weight']),
    'unknown_model_arg': ('resnet18', lambda t, r: _edit_config(
        shutil.copytree(r[1], t / 'c'), model_args={'frobnicate': 2}), ValueError,
        ['frobnicate=2', 'not known']),
    'missing_file': ('resnet18', lambda t, r: f'timm:{t / "nothing.safetensors"}',
                     FileNotFoundError, ['does not exist', 'nothing.safetensors']),
    'dir_without_weights': ('resnet18', lambda t, r: (t / 'empty').mkdir() or str(t / 'empty'),
                            FileNotFoundError, ['holds no timm weights file']),
    'unknown_format': ('resnet18', lambda t, r: 'tensorflow:/x/ckpt', ValueError,
                       ["unknown weights format 'tensorflow'", 'timm:DIR']),
}


@pytest.mark.parametrize('case', sorted(REFUSALS))
def test_refusals_are_one_line(case, resnet18, tmp_path):
  name, build, error_type, words = REFUSALS[case]
  spec = build(tmp_path, resnet18)
  with pytest.raises(error_type) as error:
    convert.load_weights(name, spec, num_classes=10)
  message = one_line(error)
  print(message)
  for w in words:
    assert w in message, (w, message)


def test_timm_name_is_downloaded_when_online(resnet18, monkeypatch, tmp_path):
  """huggingface_hub.hf_hub_download stands in for the Hub: it fills the cache layout."""
  huggingface_hub = pytest.importorskip('huggingface_hub')
  _, directory = resnet18
  cache = tmp_path / 'hub'
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  calls = []

  def fake_download(repo, filename, cache_dir):
    calls.append((repo, filename))
    snapshot = cache / f'models--{repo.replace("/", "--")}' / 'snapshots' / 'c0ffee'
    snapshot.mkdir(parents=True, exist_ok=True)
    return shutil.copy(os.path.join(directory, filename), snapshot / filename)
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
  _, report = convert.load_weights('resnet18', 'timm:resnet18.a1_in1k')
  assert calls == [('timm/resnet18.a1_in1k', 'config.json'),
                   ('timm/resnet18.a1_in1k', 'model.safetensors')]
  assert str(cache) in report.source and report.preprocessing['crop_pct'] == 0.95

  def no_network(repo, filename, cache_dir):
    raise ConnectionError('Failed to resolve huggingface.co\nretrying')
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
  with pytest.raises(FileNotFoundError) as error:
    convert.load_weights('resnet18', 'timm:resnet50.a1_in1k')
  message = one_line(error)
  assert 'download failed: ConnectionError: Failed to resolve huggingface.co' in message
  assert 'timm/resnet50.a1_in1k' in message
