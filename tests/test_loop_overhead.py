"""The training loop's time accounting, and the `loop` / `input` benchmarks on a tiny setting.

The real loop (`train.train_and_evaluate`, in-process, the 4 fake CPU devices of conftest.py)
runs the benchmarks' null model (`_null`: the mean of the image and a Dense head, registered
only inside `loop.null_model()`) on a 4-class synthetic set of 20 px images. Checked: the
accounting of results.json and metrics.jsonl (host_overhead_s + device_wait_s = train_time_s,
row sums within the totals) and that the benchmarks' functions return what their tables print.
Never a speed: the machines that run this are shared.
"""

import argparse
import json
import math
import os
import sys

import pytest

from flowers_jax import checkpoint, models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'scripts'))
from benchmarks import input as input_bench  # noqa: E402
from benchmarks import loop as loop_bench  # noqa: E402

TOL = 1e-6
ARGS = dict(steps=12, rows=3, batch=8, size=16, repeats=1, pp_train='none', on_device='host',
            log_every=10, no_breakdown=False, profile=0)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
  """train_and_evaluate installs SIGTERM/SIGINT handlers; give pytest its own back."""
  yield
  checkpoint.restore_signal_handlers()


@pytest.fixture(scope='module')
def null():
  with loop_bench.null_model() as name:
    yield name
  assert name not in models.names()  # taken out again


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return loop_bench.make_data(str(tmp_path_factory.mktemp('flowers')))


def _args(**overrides) -> argparse.Namespace:
  return argparse.Namespace(**{**ARGS, **overrides})


def _read(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return results, rows


@pytest.mark.parametrize('source', loop_bench.INPUTS)
def test_results_and_rows_account_for_the_train_time(null, data_dir, tmp_path, source):
  config = loop_bench.loop_config(data_dir, _args())
  assert config.model.name == null
  real, _ = loop_bench.real_and_bare(config, str(tmp_path), source)
  results, rows = _read(str(tmp_path))
  assert results == real['results'] and results['steps'] == ARGS['steps']
  assert results['host_overhead_s'] >= 0 and results['device_wait_s'] >= 0
  assert abs(results['host_overhead_s'] + results['device_wait_s']
             - results['train_time_s']) <= TOL
  assert [r['step'] for r in rows] == [4, 8, 12]
  for key in ('input_wait_s', 'host_overhead_s'):
    assert all(r[key] >= 0 for r in rows), key
    assert sum(r[key] for r in rows) <= results[key] + TOL, key
  # The per-step figures the benchmark derives from them.
  assert real['timed_steps'] == ARGS['steps'] - 1 and real['window'] == 4
  assert real['steady_device_ms'] >= -TOL and real['steps_per_s'] > 0


def test_loop_benchmark_returns_what_its_tables_print(null, tmp_path):
  args = _args()
  result, text = loop_bench.run_all(args, str(tmp_path))
  for key in loop_bench.RESULT_KEYS:
    assert math.isfinite(result[key]), key
  assert len(result['runs']['bare']) == args.repeats
  for source in loop_bench.INPUTS:
    parts = result['breakdown'][source]
    assert set(parts) == set(loop_bench.PARTS) | {'step to step', 'rest'}
    assert parts['step to step'][0] > 0
  assert 'real - bare' in text and 'Loop parts per step' in text


def test_input_benchmark_parts_return_what_their_tables_print(null, tmp_path):
  args = argparse.Namespace(classes=2, per_class=8, source_size='64x48', source_hw=(48, 64),
                            size=32, batch=8, images=8, windows=1, repeats=1, cores=[1],
                            pp_train='rrc_flip', device_batches=1, e2e_pp_train='none',
                            e2e_on_device='host', e2e_size=16, e2e_batch=8)
  data_dir = input_bench.make_data(str(tmp_path / 'data'), args)

  rate = input_bench.pinned_rate(data_dir=data_dir, stream='host', cores=1, size=32, batch=8,
                                 images=8, windows=1, pp_train='rrc_flip')
  assert rate['cpus'] == sorted(os.sched_getaffinity(0))[:1] and rate['images_per_s'] > 0
  rows = [{'stream': s, 'cores': 1, 'images_per_s': 1.0, 'repeats': [1.0]}
          for s in input_bench.STREAMS]
  assert all(set(input_bench.HOST_KEYS) <= set(r) for r in rows)
  assert input_bench.STREAM_LABELS['host'] in input_bench.host_table(rows, args)

  assert input_bench.device_ready()
  device = input_bench.device_rate(data_dir, args)
  assert set(input_bench.DEVICE_KEYS) <= set(device) and device['images_per_s'] > 0
  assert 'device_pp.Augmenter' in input_bench.device_table(device, args)

  config = loop_bench.loop_config(loop_bench.make_data(str(tmp_path / 'tiny')),
                                  _args(steps=6, rows=3))
  row = input_bench.e2e_measure(null, config, str(tmp_path / 'e2e'))
  assert set(input_bench.E2E_KEYS) <= set(row) and row['ratio'] > 0
  assert f'| {null} |' in input_bench.e2e_table([row], args)


def test_device_part_says_what_is_missing():
  with pytest.raises(NotImplementedError, match='device_pp.py'):
    input_bench.device_not_available()
