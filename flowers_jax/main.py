r"""Command line: train and evaluate one experiment.

  python -m flowers_jax.main --config configs/resnet18.py:finetune --workdir runs/r18 \
      --config.data.dir=~/flowers102 --config.train.epochs=5

`--config FILE.py:ARG` picks a config file and its variant or args (listed in the file's
docstring), e.g. `configs/resnet18.py:frozen` or
`configs/resnet18.py:deform=parallel_conv1,init=pretrained`; any key can be overridden with
`--config.a.b=value`. Running again on the same `--workdir` resumes an interrupted run.
"""

import os
import sys
import traceback

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # tensorflow's C++ INFO lines (oneDNN notice)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flowers_jax import config_utils  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None,
                                'Experiment config: configs/<model>.py:<variant or args>.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')


def _fail(message: str, *, alone: bool = False) -> None:
  print(f'error: {message}', file=sys.stderr)
  _exit(2, alone=alone)


def _exit(code: int, *, alone: bool) -> None:
  """Exits with `code`. `alone`: one process of a multi-host run leaving on its own error, at
  once (`os._exit`): a normal exit would wait in jax.distributed's shutdown barrier for up to
  5 minutes, for peers blocked in a collective this process will never join. Without its
  heartbeats the peers are ended after `distributed.heartbeat_timeout_s`."""
  if not alone:
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with one-line errors for bad config files, variants and keys."""
  if any(a in ('--help', '-h', '--helpshort') for a in argv[1:]):
    print(__doc__)
    print(FLAGS.main_module_help())
    sys.exit(0)
  spec = config_utils.config_spec_from_argv(argv)
  if spec is not None and '--helpfull' not in argv:
    try:
      config_utils.check_override_keys(config_utils.load_config(spec), argv)
    except Exception as e:  # the config file's own error (unknown variant, ...) in one line
      _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # library INFO logs (jax backends, orbax) unless asked for
    logging.set_verbosity(logging.WARNING)
  if FLAGS.config is None or FLAGS.workdir is None:
    _fail('both --config configs/<model>.py:<variant> and --workdir DIR are required '
          '(see --help)')
  config = FLAGS.config
  from flowers_jax import config_checks, parallel
  try:
    config_checks.validate(config)
  except ValueError as e:
    _fail(str(e).splitlines()[0])
  dist = config.distributed
  parallel.initialize_distributed(dist.coordinator_address, dist.num_processes, dist.process_id,
                                  dist.heartbeat_timeout_s)
  many_hosts = bool(dist.coordinator_address)
  from flowers_jax import checkpoint, train, workdir_lock
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except (FileNotFoundError, ValueError, checkpoint.DiskSpaceError,
          checkpoint.CheckpointDamagedError, checkpoint.CheckpointWriteError,
          train.NonFiniteLossError,
          workdir_lock.WorkdirInUseError) as e:
    _fail(str(e).splitlines()[0], alone=many_hosts)
  except Exception:
    if not many_hosts:
      raise
    traceback.print_exc()
    _exit(1, alone=True)


def run() -> None:
  """The command line: absl's app with this module's flag parsing."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
