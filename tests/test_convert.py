"""torchvision <-> Flax conversion: round trips, head replacement, errors, files."""

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_util import flat
from flowers_jax import convert
from flowers_jax import models
from flowers_jax.models import registry

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def state_dict():
  torch.manual_seed(0)
  return torchvision.models.resnet18(weights=None).state_dict()


def assert_same_trees(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    np.testing.assert_array_equal(fa[path], fb[path], err_msg=path)


def test_round_trip_is_exact_and_torch_loads_it(state_dict):
  variables, report = convert.torchvision_to_flax('resnet18', state_dict)
  assert len(report.loaded) == 102 and not report.dropped and not report.initialised
  assert sum(v.size for v in jax.tree_util.tree_leaves(variables['params'])) == 11_689_512
  assert variables['params']['layer1']['0']['conv1']['kernel'].shape == (3, 3, 64, 64)
  back = convert.flax_to_torchvision('resnet18', variables)
  expected = {k: v.numpy() for k, v in state_dict.items() if 'num_batches_tracked' not in k}
  assert sorted(back) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(back[key], expected[key], err_msg=key)
  again, _ = convert.torchvision_to_flax('resnet18', back)
  assert_same_trees(again, variables)
  model = torchvision.models.resnet18(weights=None)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_new_head_is_initialised_and_old_one_dropped(state_dict):
  variables, report = convert.torchvision_to_flax('resnet18', state_dict, num_classes=102)
  assert sorted(report.dropped) == ['fc.bias', 'fc.weight']
  assert sorted(report.initialised) == ['params/fc/bias', 'params/fc/kernel']
  assert len(report.loaded) == 100 and 'layer4.1.bn2.running_var' in report.loaded
  assert 'dropped 2' in report.summary() and 'params/fc/kernel' in report.summary()
  assert variables['params']['fc']['kernel'].shape == (512, 102)
  np.testing.assert_array_equal(variables['params']['conv1']['kernel'],
                                state_dict['conv1.weight'].numpy().transpose(2, 3, 1, 0))
  # fresh leaves: torch nn.Linear's init range, reproducible with the same rng
  bound = 512 ** -0.5
  assert 0.5 * bound < np.abs(variables['params']['fc']['kernel']).max() <= bound
  again, _ = convert.torchvision_to_flax('resnet18', state_dict, num_classes=102)
  np.testing.assert_array_equal(again['params']['fc']['kernel'],
                                variables['params']['fc']['kernel'])
  other, _ = convert.torchvision_to_flax('resnet18', state_dict, num_classes=102,
                                         rng=jax.random.PRNGKey(1))
  assert not np.array_equal(other['params']['fc']['kernel'], variables['params']['fc']['kernel'])
  model = models.create('resnet18', num_classes=102)
  logits, _ = jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 32, 3)))
  assert logits.shape == (1, 102)


def test_num_classes_defaults_to_the_checkpoints(state_dict):
  small = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()
  variables, report = convert.torchvision_to_flax('resnet18', small)
  assert variables['params']['fc']['bias'].shape == (7,) and not report.initialised


def test_shape_mismatch_outside_the_head_names_key_and_shapes(state_dict):
  broken = dict(state_dict)
  broken['layer2.0.conv1.weight'] = torch.zeros(128, 64, 5, 5)
  with pytest.raises(ValueError) as error:
    convert.torchvision_to_flax('resnet18', broken)
  message = str(error.value)
  assert 'layer2.0.conv1.weight' in message
  assert '(128, 64, 5, 5)' in message and '(128, 64, 3, 3)' in message


def test_unknown_keys_dropped_and_missing_leaves_initialised(state_dict):
  partial = {k: v for k, v in state_dict.items() if not k.startswith('layer1.0.bn1.')}
  partial['layer1.0.se.fc1.weight'] = torch.ones(4, 64, 1, 1)
  with pytest.raises(ValueError, match=r'4 of 100 backbone tensors missing'):
    convert.torchvision_to_flax('resnet18', partial)
  variables, report = convert.torchvision_to_flax('resnet18', partial, allow_partial=True)
  assert report.dropped == ['layer1.0.se.fc1.weight']
  assert sorted(report.initialised) == [
      'batch_stats/layer1/0/bn1/mean', 'batch_stats/layer1/0/bn1/var',
      'params/layer1/0/bn1/bias', 'params/layer1/0/bn1/scale']
  np.testing.assert_array_equal(variables['batch_stats']['layer1']['0']['bn1']['var'], 1.0)


def test_flax_to_torchvision_rejects_variables_of_another_model(state_dict):
  variables, _ = convert.torchvision_to_flax('resnet18', state_dict)
  with pytest.raises(ValueError, match='resnet34'):
    convert.flax_to_torchvision('resnet34', variables)


def test_pth_file_and_convert_script_round_trip(state_dict, tmp_path):
  pth = tmp_path / 'resnet18.pth'
  torch.save(state_dict, pth)
  direct, _ = convert.torchvision_to_flax('resnet18', state_dict)
  from_file, _ = convert.torchvision_to_flax('resnet18', str(pth))
  assert_same_trees(from_file, direct)

  spec = importlib.util.spec_from_file_location(
      'convert_torchvision', ROOT / 'scripts' / 'convert_torchvision.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / 'ckpt'
  report = script.main(['--model', 'resnet18', '--weights', str(pth), '--out', str(out)])
  assert len(report.loaded) == 102
  assert_same_trees(convert.load_variables(out), direct)
  assert convert.load_metadata(out)['num_classes'] == 1000

  # the directory stands in for the .pth, without torch
  head102, report = convert.torchvision_to_flax('resnet18', out, num_classes=102)
  assert sorted(report.dropped) == ['fc.bias', 'fc.weight']
  np.testing.assert_array_equal(head102['params']['layer4']['1']['conv2']['kernel'],
                                direct['params']['layer4']['1']['conv2']['kernel'])


# --- what a weights file may look like, and what it must hold ---------------------------

def _prefixed(sd, prefix):
  return {prefix + k: v for k, v in sd.items()}


WRAPPERS = {  # how training scripts save a state_dict sd
    'model': lambda sd: {'model': sd, 'epoch': 3},                    # torchvision references
    'state_dict': lambda sd: {'state_dict': sd, 'optimizer': {'lr': 0.1}},  # Lightning
    'model_state_dict': lambda sd: {'model_state_dict': sd},         # torch tutorials
    'nested_twice': lambda sd: {'checkpoint': 1, 'model': {'state_dict': sd}},
    'module_prefix': lambda sd: _prefixed(sd, 'module.'),             # DataParallel / DDP
    'ddp_in_model': lambda sd: {'model': _prefixed(sd, 'module.')},
}


def one_line(error) -> str:
  message = str(error.value)
  assert message and '\n' not in message, message
  return message


@pytest.mark.parametrize('wrapper', sorted(WRAPPERS))
def test_wrapped_state_dicts_load_every_tensor(state_dict, wrapper, tmp_path):
  plain, _ = convert.torchvision_to_flax('resnet18', state_dict)
  wrapped = WRAPPERS[wrapper](dict(state_dict))
  variables, report = convert.torchvision_to_flax('resnet18', wrapped)
  assert len(report.loaded) == 102 and not report.dropped and not report.initialised
  assert_same_trees(variables, plain)
  pth = tmp_path / 'wrapped.pth'
  torch.save(wrapped, pth)
  from_file, report = convert.torchvision_to_flax('resnet18', str(pth), num_classes=102)
  assert len(report.loaded) == 100 and sorted(report.dropped) == ['fc.bias', 'fc.weight']
  np.testing.assert_array_equal(from_file['params']['layer4']['1']['conv2']['kernel'],
                                plain['params']['layer4']['1']['conv2']['kernel'])


def test_keys_that_do_not_line_up_raise_one_line(state_dict):
  renamed = _prefixed(state_dict, 'backbone.')
  with pytest.raises(ValueError) as error:
    convert.torchvision_to_flax('resnet18', renamed, num_classes=102)
  message = one_line(error)
  assert '100 of 100 backbone tensors missing' in message
  assert 'conv1.weight' in message and 'backbone.conv1.weight' in message
  assert 'allow_partial' in message

  no_layer4 = {k: v for k, v in state_dict.items() if not k.startswith('layer4.')}
  with pytest.raises(ValueError, match=r'^resnet18: 25 of 100 backbone tensors missing.*layer4'):
    convert.torchvision_to_flax('resnet18', no_layer4)


def test_layers_an_option_adds_are_no_backbone(state_dict):
  """A full torchvision file into a deformable model: the new layers are initialised; a
  torchvision tensor missing still raises."""
  variables, report = convert.torchvision_to_flax('resnet18', state_dict, num_classes=102,
                                                  deform='every_stage')
  assert len(report.loaded) == 100
  assert {p.split('/')[1] for p in report.initialised} == {
      'fc', 'layer1_deform', 'layer2_deform', 'layer3_deform', 'layer4_deform'}
  partial = {k: v for k, v in state_dict.items() if k != 'layer2.1.conv2.weight'}
  with pytest.raises(ValueError, match=r'1 of 100 backbone tensors missing.*layer2\.1\.conv2'):
    convert.torchvision_to_flax('resnet18', partial, num_classes=102, deform='every_stage')


def test_allow_partial_loads_half_and_initialises_the_rest(state_dict):
  plain, _ = convert.torchvision_to_flax('resnet18', state_dict)
  keys = [k for k in state_dict if not k.endswith('num_batches_tracked')]
  half = {k: state_dict[k] for k in keys[:len(keys) // 2]}
  variables, report = convert.torchvision_to_flax('resnet18', half, num_classes=1000,
                                                  allow_partial=True)
  assert sorted(report.loaded) == sorted(half) and not report.dropped
  assert len(report.initialised) == 51 and 'freshly initialised 51' in report.summary()
  fresh, loaded = flat(variables), flat(plain)
  back = convert.flax_to_torchvision('resnet18', variables)
  for key in keys:
    if key in half:
      np.testing.assert_array_equal(back[key], state_dict[key].numpy(), err_msg=key)
  initialised = [p for p in report.initialised if 'conv' in p]
  assert initialised and all(not np.array_equal(fresh[p], loaded[p]) for p in initialised)


def _write_text(path):
  path.write_text('not weights\n')


def _write_mat(path):
  scipy_io = pytest.importorskip('scipy.io')
  scipy_io.savemat(path, {'labels': np.arange(1, 11)[None]})


def _write_tensor(path):
  torch.save(torch.zeros(3), path)


NOT_WEIGHTS = {  # name -> (file name, writer); a None writer makes an empty directory
    'mat_file': ('imagelabels.mat', _write_mat),
    'text_file': ('notes.txt', _write_text),
    'a_tensor': ('tensor.pth', _write_tensor),
    'empty_directory': ('empty', None),
    'directory_of_files': ('jpg', lambda path: (path.mkdir(), _write_text(path / 'a.jpg'))),
}


def _not_weights(tmp_path, kind):
  name, writer = NOT_WEIGHTS[kind]
  path = tmp_path / name
  if writer is None:
    path.mkdir()
  else:
    writer(path)
  return path


@pytest.mark.parametrize('kind', sorted(NOT_WEIGHTS))
def test_not_a_weights_file_is_one_line_value_error(tmp_path, kind):
  path = _not_weights(tmp_path, kind)
  with pytest.raises(ValueError) as error:
    convert.torchvision_to_flax('resnet18', str(path))
  message = one_line(error)
  assert str(path) in message
  assert '.pth' in message and 'scripts/convert_torchvision.py' in message


def test_missing_path_is_one_line_file_not_found(tmp_path):
  path = tmp_path / 'resnet18.pth'
  with pytest.raises(FileNotFoundError) as error:
    convert.torchvision_to_flax('resnet18', path)
  message = one_line(error)
  assert 'does not exist' in message and str(path) in message
  assert 'scripts/convert_torchvision.py' in message


def _script():
  spec = importlib.util.spec_from_file_location(
      'convert_torchvision', ROOT / 'scripts' / 'convert_torchvision.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script


def test_convert_script_stops_with_one_line(tmp_path, state_dict):
  script = _script()
  out = tmp_path / 'ckpt'
  cases = {'is not a torch weights file': _not_weights(tmp_path, 'mat_file'),
           'does not exist': tmp_path / 'missing.pth'}
  half = tmp_path / 'half.pth'
  torch.save({k: v for k, v in state_dict.items() if not k.startswith('layer4.')}, half)
  cases['backbone tensors missing'] = half
  for expected, weights in cases.items():
    with pytest.raises(SystemExit) as error:
      script.main(['--model', 'resnet18', '--weights', str(weights), '--out', str(out)])
    message = error.value.code
    assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message
    assert expected in message and not out.exists()
  report = script.main(['--model', 'resnet18', '--weights', str(half), '--out', str(out),
                        '--allow-partial'])
  assert len(report.loaded) == 77 and len(report.initialised) == 25


# --- special rows, the mechanism models like ViT use -----------------------------------

class Toy(nn.Module):
  """Two Dense 'q'/'k' kernels stored in torch as one stacked 'attn.in_proj_weight'."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    x = x.mean(axis=(1, 2))  # [B, 3]
    x = nn.Dense(4, use_bias=False, name='q')(x) + nn.Dense(4, use_bias=False, name='k')(x)
    x = x + self.param('token', nn.initializers.zeros, (4,))
    return nn.Dense(self.num_classes, name='head')(x)


def _split(w):  # torch (8, 3) -> 2 x (3, 4)
  return tuple(m.T for m in np.split(w, 2))


def _merge(q, k):
  return np.concatenate([q.T, k.T])


@pytest.fixture
def toy_model():
  rules = (registry.TorchRule('attn.in_proj_weight', ('params/q/kernel', 'params/k/kernel'),
                              to_flax=_split, to_torch=_merge),
           registry.TorchRule('cls_{name}', 'params/{name}'))
  registry.register('toy_qk', head=r'^head/', torch_rules=rules,
                    torch_aliases=((r'^classifier\.', 'head.'),))(
      lambda num_classes=3, *, bn_axis_name=None, dtype=jnp.float32: Toy(num_classes))
  yield 'toy_qk'
  registry._MODELS.pop('toy_qk')
  registry.HEAD_PATTERNS.pop('toy_qk')


def test_special_rules_split_merge_and_aliases(toy_model):
  rng = np.random.RandomState(0)
  torch_sd = {'attn.in_proj_weight': rng.randn(8, 3), 'cls_token': rng.randn(4),
              'classifier.weight': rng.randn(3, 4), 'classifier.bias': rng.randn(3)}
  torch_sd = {k: v.astype(np.float32) for k, v in torch_sd.items()}
  variables, report = convert.torchvision_to_flax(toy_model, torch_sd)
  assert not report.initialised and not report.dropped
  params = variables['params']
  np.testing.assert_array_equal(params['k']['kernel'], torch_sd['attn.in_proj_weight'][4:].T)
  np.testing.assert_array_equal(params['head']['kernel'], torch_sd['classifier.weight'].T)
  back = convert.flax_to_torchvision(toy_model, variables)
  assert sorted(back) == ['attn.in_proj_weight', 'cls_token', 'head.bias', 'head.weight']
  for key in torch_sd:
    np.testing.assert_array_equal(back[key.replace('classifier', 'head')], torch_sd[key])

  torch_sd['attn.in_proj_weight'] = np.zeros((6, 3), np.float32)
  with pytest.raises(ValueError, match=r"attn\.in_proj_weight.*\(6, 3\).*\(8, 3\)"):
    convert.torchvision_to_flax(toy_model, torch_sd)


def test_download_without_network_is_one_line(tmp_path):
  """A closed proxy port stands in for no network; an empty TORCH_HOME for no cached file."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(https_proxy='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9',
             http_proxy='http://127.0.0.1:9', TORCH_HOME=str(tmp_path / 'torch'))
  proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'convert_torchvision.py'),
                         '--model', 'resnet18', '--download', '--out', str(tmp_path / 'out')],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: cannot download https://download.pytorch.org/models/'
                             'resnet18-'), lines[0]
  assert '--weights FILE' in lines[0] and str(tmp_path / 'torch') in lines[0]
  assert not (tmp_path / 'out').exists()
