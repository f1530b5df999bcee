r"""Runs the study's experiments (and the improvements) one after another, one workdir each.

  python scripts/run_experiments.py --suite study|beyond|all --data-dir ~/flowers102 \
      --weights-dir weights --out runs [--only 'resnet18_*'] [--dry-run] [--config.x=y ...]
  python scripts/run_experiments.py --suite all --smoke --out runs/smoke   # CPU, a few minutes

Each run is `python -m flowers_jax.main --config configs/<model>.py:<variant>
--workdir OUT/<model>_<variant> ...`, its output appended to `OUT/<run>/train.log`; one line
per run is printed: name, status, test accuracy, wall time. Running the same command again
skips finished runs (`results.json` present, made with the config this command gives) and
resumes interrupted ones from their checkpoint (Ctrl-C or `kill PID` stops the current run
after its step, with a checkpoint). A finished run made with another config is `stale`: it is
neither reported as done nor run again (the differing keys are named; move it away to redo it).
`--data-dir` must exist: it is checked once, before the first run.
Extra `--config.key=value` arguments go to every run.

Suites (`SUITES`): `study` = the study's runs (each model's frozen, finetune and
modification: EfficientNet-B0 eca, ViT-B/16 tcel, ResNet18 deform_after_conv1 and
deform_parallel_conv1: 10 runs); `beyond` = the study's proposed improvements (eca_spatial,
tcel_hard, deform_*_pretrained_init) and the `strong` recipe of each model; `all` = both.

`--weights-dir W` holds torchvision's ImageNet weights, found per model under the first
existing name of `WEIGHT_FILES` (the directories `scripts/convert_torchvision.py --out`
writes, or torchvision's own .pth files):

  W/resnet18/         or W/resnet18-f37072fd.pth
  W/efficientnet_b0/  or W/effnet_b0/  or W/efficientnet_b0_rwightman-7f5810bc.pth
  W/vit_b16/          or W/vit_b_16-c867db91.pth

`--smoke`: every run on a synthetic 4-class set (`--data-dir`, else made in OUT/smoke_data)
at 32 px, 2 epochs of 2 steps, batch 4, random init (`SMOKE_OVERRIDES`): checks that the
whole suite runs, not what it reaches.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUDY = (
    ('efficientnet_b0', 'frozen'), ('efficientnet_b0', 'finetune'), ('efficientnet_b0', 'eca'),
    ('vit_b16', 'frozen'), ('vit_b16', 'finetune'), ('vit_b16', 'tcel'),
    ('resnet18', 'frozen'), ('resnet18', 'finetune'),
    ('resnet18', 'deform_after_conv1'), ('resnet18', 'deform_parallel_conv1'),
)
BEYOND = (
    ('efficientnet_b0', 'eca_spatial'), ('efficientnet_b0', 'strong'),
    ('vit_b16', 'tcel_hard'), ('vit_b16', 'strong'),
    ('resnet18', 'deform_after_conv1_pretrained_init'),
    ('resnet18', 'deform_parallel_conv1_pretrained_init'),
    ('resnet18', 'deform_every_stage_pretrained_init'), ('resnet18', 'strong'),
)
SUITES = {'study': STUDY, 'beyond': BEYOND, 'all': STUDY + BEYOND}

WEIGHT_FILES = {
    'resnet18': ('resnet18', 'resnet18-f37072fd.pth'),
    'efficientnet_b0': ('efficientnet_b0', 'effnet_b0', 'efficientnet_b0_rwightman-7f5810bc.pth'),
    'vit_b16': ('vit_b16', 'vit_b_16-c867db91.pth'),
}

SMOKE_DATA = dict(num_classes=4, per_class=8, image_size=40, seed=0, splits=(0.5, 0.25))
SMOKE_OVERRIDES = {
    'model.num_classes': SMOKE_DATA['num_classes'],
    'init.torchvision': '',
    'data.image_size': 32,
    'train.epochs': 2,
    'train.max_steps_per_epoch': 2,
    'train.batch_size': 4,
    'train.eval_batch_size': 8,
    'train.pk_k': 2,  # P x K batches of 2 classes x 2 images (tcel_hard)
    'train.log_every': 1,
    'optim.warmup_steps': 0,  # 4 steps in all: no room for the variants' warmups
}


INTERRUPTED = (130, 143)  # flowers_jax.main's exit status after a checkpoint on SIGINT / SIGTERM


class UsageError(ValueError):
  pass


def run_name(model: str, variant: str) -> str:
  return f'{model}_{variant}'


def select(suite: str, only: str) -> list[tuple[str, str]]:
  """The suite's (model, variant) pairs whose run name matches a glob of `only` (a,b,...)."""
  runs = list(SUITES[suite])
  if only:
    globs = [g.strip() for g in only.split(',') if g.strip()]
    runs = [r for r in runs if any(fnmatch.fnmatch(run_name(*r), g) for g in globs)]
    if not runs:
      names = ', '.join(run_name(*r) for r in SUITES[suite])
      raise UsageError(f'--only {only!r} matches no run of suite {suite!r}; its runs: {names}')
  return runs


def weights_for(model: str, weights_dir: str) -> str:
  for name in WEIGHT_FILES[model]:
    path = os.path.join(weights_dir, name)
    if os.path.exists(path):
      return path
  raise UsageError(f'no weights for {model} in {weights_dir}: expected one of '
                   f'{", ".join(WEIGHT_FILES[model])} (see scripts/convert_torchvision.py)')


def smoke_data(out: str, data_dir: str | None) -> str:
  """`data_dir`, or the synthetic set under OUT/smoke_data (written once)."""
  if data_dir:
    return os.path.abspath(os.path.expanduser(data_dir))
  path = os.path.abspath(os.path.join(out, 'smoke_data'))
  if not os.path.isfile(os.path.join(path, 'setid.mat')):
    from flowers_jax.data.fake import make_fake_flowers
    make_fake_flowers(path, **SMOKE_DATA)
  return path


def command(model: str, variant: str, workdir: str, args, data_dir: str) -> list[str]:
  """The `python -m flowers_jax.main` command line of one run."""
  cmd = [sys.executable, '-m', 'flowers_jax.main',
         '--config', os.path.join(ROOT, 'configs', f'{model}.py:{variant}'),
         '--workdir', workdir, f'--config.data.dir={data_dir}']
  if args.smoke:
    cmd += [f'--config.{k}={v}' for k, v in SMOKE_OVERRIDES.items()]
  elif args.weights_dir:
    cmd.append(f'--config.init.torchvision={weights_for(model, args.weights_dir)}')
  return cmd + args.overrides


def child_env(out: str) -> dict:
  """The runs share a persistent XLA cache (resumed and repeated programs compile once)."""
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(out), '.jax_cache'))
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return env


def _wait(proc: subprocess.Popen) -> int:
  """Waits for `proc`; SIGTERM is passed on, Ctrl-C reached it through the process group."""
  previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
  interrupted = False
  try:
    while True:
      try:
        return proc.wait()
      except KeyboardInterrupt:
        interrupted = True
  finally:
    signal.signal(signal.SIGTERM, previous)
    if interrupted and proc.returncode is None:
      proc.wait()


def _hms(seconds: float | None) -> str:
  if seconds is None:
    return ''
  s = int(round(seconds))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def _results(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'results.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _last_error(log_path: str) -> str:
  with open(log_path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines if line.startswith('error:')]
  return (errors or lines or [''])[-1][:200]


def report_line(name: str, status: str, results: dict | None, seconds: float | None) -> str:
  acc = f'test {results["test_accuracy"]:.4f}' if results else ''
  return f'{name:<47} {status:<12} {acc:<11} {_hms(seconds)}'


def config_changes(cmd: list[str], workdir: str) -> list[str]:
  """The config keys (dotted) whose values differ between the run's config.json and the config
  that `cmd` gives, compared as a resume compares them (`train.config_changes`)."""
  from flowers_jax import config_utils, train
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return ['config.json (missing)']
  with open(path) as f:
    saved = json.load(f)
  config = config_utils.config_from_argv(cmd)
  train.resolve_preprocessing(config)  # as the run resolved it before writing config.json
  return list(train.config_changes(saved, config))


def run_one(model: str, variant: str, args, data_dir: str, env: dict) -> tuple[str, int]:
  """Runs (or skips) one experiment and prints its line; returns (status, return code)."""
  name = run_name(model, variant)
  workdir = os.path.join(args.out, name)
  cmd = command(model, variant, workdir, args, data_dir)
  done = _results(workdir)
  if done is not None:
    changed = config_changes(cmd, workdir)
    if changed:
      shown = ', '.join(changed[:4]) + (f' and {len(changed) - 4} more' if len(changed) > 4
                                        else '')
      print(f'{report_line(name, "stale", done, done.get("wall_time_s"))}  made with another '
            f'config ({shown}); move {workdir} away to run it again', flush=True)
      return 'stale', 0
    print(report_line(name, 'done', done, done.get('wall_time_s')), flush=True)
    return 'done', 0
  if args.dry_run:
    print(' '.join(cmd))
    return 'dry-run', 0
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  resuming = os.path.isdir(latest) and any(d.isdigit() for d in os.listdir(latest))
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, 'train.log')
  print(f'{name:<47} running{" (resuming)" if resuming else ""}, log: {log_path}',
        end='\r' if sys.stdout.isatty() else '\n', flush=True)
  t0 = time.time()
  with open(log_path, 'a') as log:
    log.write(f'$ {" ".join(cmd)}\n')
    log.flush()
    rc = _wait(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  results = _results(workdir)
  status = ('interrupted' if rc in INTERRUPTED else f'failed rc={rc}' if rc or results is None
            else 'resumed' if resuming else 'ok')
  line = report_line(name, status, results, time.time() - t0)
  if status.startswith('failed'):
    line += f'  {_last_error(log_path)}'
  print(f'{line:<100}', flush=True)
  return status, rc


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   epilog='Any --config.key=value is passed to every run.')
  parser.add_argument('--suite', choices=sorted(SUITES), default='study')
  parser.add_argument('--data-dir', help='Flowers102 (raw layout; or see data.source)')
  parser.add_argument('--weights-dir', help='torchvision weights, see WEIGHT_FILES')
  parser.add_argument('--out', required=True, help='one workdir per run under it')
  parser.add_argument('--smoke', action='store_true', help='synthetic data, tiny and fast')
  parser.add_argument('--only', default='', help='comma-separated globs on run names')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognized arguments: {" ".join(bad)} (only --config.key=value pass '
                 'through to the runs)')
  args.overrides = rest
  if not args.smoke and not args.data_dir:
    parser.error('--data-dir is required (or --smoke for the synthetic set)')
  if not args.smoke and not args.weights_dir:
    print('warning: no --weights-dir: every run starts from random init, unlike the study',
          file=sys.stderr)
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    runs = select(args.suite, args.only)
    if args.weights_dir and not args.smoke:
      for model in dict(runs):
        weights_for(model, args.weights_dir)  # a missing file stops before the first run
    if args.data_dir and not os.path.isdir(os.path.expanduser(args.data_dir)):
      raise UsageError(f'--data-dir {args.data_dir} is not a directory; pass the Flowers102 '
                       'files (jpg/, imagelabels.mat, setid.mat), or --smoke alone')
    os.makedirs(args.out, exist_ok=True)
    data_dir = (smoke_data(args.out, args.data_dir) if args.smoke
                else os.path.abspath(os.path.expanduser(args.data_dir)))
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  env, t0, statuses = child_env(args.out), time.time(), []
  for model, variant in runs:
    status, rc = run_one(model, variant, args, data_dir, env)
    statuses.append(status)
    if status == 'interrupted':
      print('interrupted: run the same command again to resume', file=sys.stderr)
      return rc
  counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
  print(f'{len(runs)} runs in {_hms(time.time() - t0)}: '
        + ', '.join(f'{n} {s}' for s, n in counts.items()))
  return 1 if any(s.startswith('failed') or s == 'stale' for s in statuses) else 0


if __name__ == '__main__':
  sys.exit(main())
