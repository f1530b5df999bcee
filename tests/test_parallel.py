"""pmap, sharded jit and a single device give the same training result on the same global batch.

A ResNet18 with BatchNorm: gradients summed instead of averaged, or BatchNorm statistics taken
per device instead of over the global batch, both change the params after a few steps.
EfficientNet-B0 with dropout and stochastic depth: masks drawn per device (not for the global
batch) change the params with the device count. Every comparison runs in float64: float32 runs
of the three modes add up in different orders and drift apart chaotically after a few steps.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import parallel_worker as worker
from flowers_jax import parallel

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def single():
  return worker.flatten(dict(zip(('params', 'batch_stats'), worker.train('single', 3))))


def _assert_close(a: dict, b: dict, rtol=1e-9, atol=1e-12):
  """Every leaf equal to float64 precision (the runs are float64 down to the loss, see
  parallel_worker.train): the modes add the same numbers in other orders, ~2e-14 apart after
  3 steps on jax 0.10 and 0.12 alike. A float32 loss or logit anywhere gives ~5e-8 on jax 0.12."""
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_pmap_metrics_are_read_from_the_first_shard_without_a_device_program():
  """get_metrics reads the first local shard's buffer (`x[0]` would queue a slicing program
  behind the step in flight); the value is the replicated one."""
  strategy = parallel.make('pmap')
  out = strategy.compile(lambda s, b: (s, {'n': jax.lax.psum(b['x'].sum(), 'batch')}))(
      strategy.put_state({'w': np.zeros(2)}), strategy.put_batch({'x': np.arange(8.0)}))[1]
  assert out['n'].shape == (jax.local_device_count(),) and jax.local_device_count() == 4
  assert strategy.get_metrics(out) == {'n': 28.0}


@pytest.mark.parametrize('mode', ['pmap', 'sharded'])
def test_parallel_modes_match_single_device(single, mode):
  got = worker.flatten(dict(zip(('params', 'batch_stats'), worker.train(mode, 3))))
  worst = _assert_close(single, got)
  print(f'{mode}: max abs diff vs single device after 3 steps: {worst:.2e}')


RANDOM_MODELS = [  # (model, marks): the toy has EfficientNet-B0's random layers and compiles
    # in a second; EfficientNet-B0 itself takes minutes per mode in float64 on 2 CPU cores.
    pytest.param('toy', id='toy'),
    pytest.param('efficientnet_b0', id='efficientnet_b0', marks=pytest.mark.slow),
]
_SINGLE = {}


def _random_single(model: str) -> dict:
  if model not in _SINGLE:
    _SINGLE[model] = worker.flatten(dict(zip(('params', 'batch_stats'),
                                             worker.train('single', 3, model=model))))
  return _SINGLE[model]


@pytest.mark.parametrize('model', RANDOM_MODELS)
@pytest.mark.parametrize('mode,n_devices', [('pmap', 4), ('pmap', 2), ('sharded', 4)])
def test_dropout_and_stochastic_depth_match_on_any_device_count(model, mode, n_devices):
  got = worker.flatten(dict(zip(('params', 'batch_stats'), worker.train(
      mode, 3, devices=jax.devices()[:n_devices], model=model))))
  worst = _assert_close(_random_single(model), got)
  print(f'{model} {mode} x {n_devices}: max abs diff vs 1 device after 3 steps: {worst:.2e}')


@pytest.mark.parametrize('model', RANDOM_MODELS)
def test_dropout_masks_matter(model):
  """The comparison above can fail: the same run without dropout / stochastic depth differs."""
  options, image = worker.MODELS[model]
  worker.MODELS['_plain'] = ({k: 0.0 for k in options}, image)
  try:
    plain = worker.flatten(dict(zip(('params', 'batch_stats'),
                                    worker.train('single', 3, model=model, options='_plain'))))
  finally:
    del worker.MODELS['_plain']
  single = _random_single(model)
  assert max(np.abs(plain[k] - single[k]).max() for k in single if 'params' in k) > 1e-3


@pytest.mark.parametrize('model', RANDOM_MODELS)
def test_resume_under_pmap_with_dropout_is_identical(model, tmp_path):
  """pmap, checkpointed after step 2 and restored into a fresh state: step 3 continues the
  same stream of dropout masks (the rng and step come back with the state)."""
  got = worker.flatten(dict(zip(('params', 'batch_stats'), worker.train(
      'pmap', 3, model=model, checkpoint_at=2, workdir=str(tmp_path)))))
  _assert_close(_random_single(model), got)


def test_single_device_result_moves(single):
  """The comparison above is meaningful: 3 steps change params and BN statistics."""
  init = worker.flatten(dict(zip(('params', 'batch_stats'), worker.train('single', 0))))
  assert not np.allclose(init['params/conv1/kernel'], single['params/conv1/kernel'])
  assert not np.allclose(init['batch_stats/bn1/mean'], single['batch_stats/bn1/mean'])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
  """2 processes x 2 fake devices (gloo on 127.0.0.1), pmap and sharded, 2 steps == 1 device
  (which equals 1 process x 4 devices, test above)."""
  script = os.path.join(HERE, 'parallel_worker.py')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  port = _free_port()
  out = str(tmp_path / 'two')
  procs = [subprocess.Popen(
      [sys.executable, script, out, '--modes', 'pmap,sharded', '--steps', '2',
       '--local-devices', '2', '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2',
       '--process-id', str(i)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), '\n'.join(o[-3000:] for o in outs)
  assert 'process 1/2: 4 devices' in outs[1]
  expected = worker.flatten(dict(zip(('params', 'batch_stats'), worker.train('single', 2))))
  for mode in ('pmap', 'sharded'):
    worst = _assert_close(expected, dict(np.load(f'{out}_{mode}.npz')))
    print(f'{mode}: 2 hosts x 2 devices vs 1 device max abs diff {worst:.2e}')


def _cli(workdir, data_dir, port=None, process_id=0, local_devices=4, extra=(), log=None,
         entry=('-m', 'flowers_jax.main')):
  """The CLI on the fake set; with `port`, as one of 2 processes (gloo on 127.0.0.1).
  `extra`: more flags; `log`: a file for its output (else a pipe); `entry`: what python runs."""
  args = [sys.executable, *entry, '--config', 'configs/demo.py',
          '--workdir', str(workdir), f'--config.data.dir={data_dir}',
          '--config.model.num_classes=4', '--config.data.image_size=16',
          '--config.train.epochs=2', '--config.train.batch_size=8',
          '--config.train.eval_batch_size=8', '--config.optim.warmup_steps=0',
          # A small lr keeps float32 round-off (other reduction orders across hosts) from
          # being amplified; wrong rows per host or a double-counted eval are O(1) anyway.
          '--config.optim.lr=1e-5']
  if port is not None:
    args += [f'--config.distributed.coordinator_address=127.0.0.1:{port}',
             '--config.distributed.num_processes=2',
             f'--config.distributed.process_id={process_id}']
  args += list(extra)
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={local_devices}'}
  out = open(log, 'w') if log else subprocess.PIPE
  return subprocess.Popen(args, cwd=os.path.dirname(HERE), env=env, stdout=out,
                          stderr=subprocess.STDOUT, text=True)


def test_cli_two_processes_match_one_process(tmp_path):
  """The whole loop (data split per host, eval psum, orbax saves from both processes) on
  2 processes x 2 devices under pmap gives the metrics of 1 process x 4 devices (sharded)."""
  from flowers_jax import data
  data_dir = tmp_path / 'data'
  data.make_fake_flowers(str(data_dir), num_classes=4, per_class=8, image_size=20, seed=0)
  port = _free_port()
  # The two processes under pmap, the one under the default (sharded): the loop's pmap path
  # on many hosts against the default path on one.
  procs = [_cli(tmp_path / 'two', data_dir, port, i, local_devices=2,
                extra=['--config.parallel=pmap']) for i in range(2)]
  procs.append(_cli(tmp_path / 'one', data_dir))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), '\n'.join(o[-3000:] for o in outs)
  rows = {name: [json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').open()]
          for name in ('one', 'two')}
  assert len(rows['one']) == len(rows['two']) == 2
  for a, b in zip(rows['one'], rows['two']):
    np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=1e-4)
    np.testing.assert_allclose(a['val_loss'], b['val_loss'], rtol=1e-4)
    assert a['val_accuracy'] == b['val_accuracy']
  results = [json.loads((tmp_path / n / 'results.json').read_text()) for n in ('one', 'two')]
  assert results[0]['test_accuracy'] == results[1]['test_accuracy']
  assert results[1]['devices'] == 4
  assert (results[0]['parallel'], results[1]['parallel']) == ('sharded', 'pmap')
