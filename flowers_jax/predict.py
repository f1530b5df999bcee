r"""Top-k class names for image files, from a run's best checkpoint.

  python -m flowers_jax.predict --workdir runs/r18_ft photo.jpg more_photos/ [--top 5] [--json]
      [--batch 32]

Reads the run's `config.json` (model, dtype, image size, interpolation), restores
`checkpoints/best` (or `checkpoints/latest`, saying so, when the run has no best yet) and
sends every image through the run's own eval transform (`data.pipeline`: shorter side
-> `data.eval_resize`, center crop `data.image_size`, then `data.mean` / `data.std` on the
device) in batches.
A directory argument stands for the image files under it (recursively, sorted). An
unreadable image is named on one line of stderr and skipped; the exit status is non-zero
only when no image could be predicted.

Class names, first found wins (`CLASS_NAME_SOURCES`):
  1. `RUN/class_names.json` (a JSON list; written here the first time names are found),
  2. the config's data source: Flowers102's 102 names for `folder` / `tfds` (`class_NNN`
     for a `folder` set of another size, as training names them), the class folders of
     `data.dir/train` for `imagefolder`,
  3. none: the class indices are printed, with a warning that says why.

Library use (also by scripts/report.py):

  run = predict.load_run('runs/r18_ft')          # Run: config, model, variables, names
  preds, errors = predict.predict_files(run, ['a.jpg', 'b.png'], top=5, batch=32)
  logits = run.logits(images)      # [B, S, S, 3] uint8 eval view (or normalised) -> [B, classes]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
CLASS_NAMES_FILE = 'class_names.json'


class PredictError(ValueError):
  """A user error: printed as one line, exit status 2."""


@dataclasses.dataclass
class Run:
  """A trained run, ready to predict.

  config: the run's config (ConfigDict); variables: {'params', 'batch_stats'};
  checkpoint: 'best' or 'latest'; meta: the checkpoint's meta dict (epoch, ...);
  class_names: num_classes strings; names_from: where they came from (a sentence).
  """
  workdir: str
  config: Any
  model: Any
  variables: dict
  checkpoint: str
  meta: dict
  class_names: tuple[str, ...]
  names_from: str
  _apply: Callable | None = None

  @property
  def mean_std(self) -> tuple[tuple, tuple]:
    """The run's normalisation (`data.mean`, `data.std`, resolved as training resolved it)."""
    from flowers_jax.data import dataset
    cfg = dataset.DataConfig.parse(self.config.data)
    return cfg.mean, cfg.std

  def logits_fn(self) -> Callable:
    """The pure `f(variables, images [B, S, S, 3]) -> float32 logits [B, num_classes]` of
    `logits` (and of every export): uint8 pixels are normalised with the run's mean / std
    (`normalization.normalize`), floats taken as normalised."""
    from flowers_jax import normalization
    model, (mean, std) = self.model, self.mean_std
    return lambda v, x: model.apply(
        v, normalization.normalize(x, mean, std), train=False)[0].astype('float32')

  def logits(self, images: np.ndarray) -> np.ndarray:
    """[B, S, S, 3] in the eval view -> float32 [B, num_classes] (`logits_fn`, jitted once)."""
    if self._apply is None:
      import jax
      self._apply = jax.jit(self.logits_fn())
    return np.asarray(self._apply(self.variables, images))


# ----------------------------------------------------------------- the run's config


def load_config(workdir: str):
  """The run's `config.json` as a ConfigDict, over `config.BASE`: a key an older run's file
  lacks has its default, which is what that run did (e.g. `data.mean` / `data.std` (): the
  ImageNet values every run used before the keys existed)."""
  import ml_collections
  from flowers_jax import config as config_lib
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise PredictError(f'run directory {workdir!r} does not exist')
  if not os.path.isfile(path):
    raise PredictError(f'{path} not found: --workdir must be a directory written by '
                       'flowers_jax.main')
  with open(path) as f:
    return ml_collections.ConfigDict(over_defaults(config_lib.BASE, json.load(f)))


def over_defaults(defaults: dict, saved: dict) -> dict:
  """`saved` with the keys it lacks taken from `defaults`, section by section."""
  out = dict(saved)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = over_defaults(v, out[k])
  return out


# ----------------------------------------------------------------- class names


def _names_from_run(workdir: str, config) -> tuple[tuple[str, ...], str] | None:
  path = os.path.join(workdir, CLASS_NAMES_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return tuple(json.load(f)), path


def _flowers_names(config) -> tuple[tuple[str, ...], str]:
  from flowers_jax.data import sources
  names = sources.default_class_names(config.model.num_classes)
  kind = 'Flowers102' if len(names) == 102 else 'generic'
  return names, f'{kind} names of data.source={config.data.source!r}'


def _imagefolder_names(config) -> tuple[tuple[str, ...], str] | None:
  root = os.path.expanduser(config.data.dir or '')
  train = os.path.join(root, 'train')
  if not os.path.isdir(train):
    return None
  names = tuple(sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d))))
  return (names, f'class folders of {train}') if names else None


# Each data source -> how to name its classes without reading the data set.
SOURCE_NAMES: dict[str, Callable] = {
    'folder': _flowers_names,
    'tfds': _flowers_names,
    'imagefolder': _imagefolder_names,
}


def class_names(workdir: str, config) -> tuple[tuple[str, ...], str]:
  """(num_classes names, where they came from); stores them in the run dir when derived."""
  n = config.model.num_classes
  found = _names_from_run(workdir, config)
  if found is None and config.data.source in SOURCE_NAMES:
    found = SOURCE_NAMES[config.data.source](config)
    if found is not None and len(found[0]) == n:
      _store_names(workdir, found[0])
  if found is None or len(found[0]) != n:
    why = (f'{os.path.join(workdir, CLASS_NAMES_FILE)} is missing and data.source='
           f'{config.data.source!r} with data.dir={config.data.dir!r} gives no names'
           if found is None else
           f'{found[1]} has {len(found[0])} names but the model has {n} classes')
    print(f'warning: no class names ({why}); printing class indices', file=sys.stderr)
    return tuple(str(i) for i in range(n)), 'class indices (no names found)'
  return found


def _store_names(workdir: str, names: Sequence[str]) -> None:
  try:
    with open(os.path.join(workdir, CLASS_NAMES_FILE), 'w') as f:
      json.dump(list(names), f, indent=0)
  except OSError:  # a read-only run dir: names are derived again next time
    pass


# ----------------------------------------------------------------- restoring


def restore_target(config, model) -> dict:
  """The model's variables ({'params', 'batch_stats' where it has BatchNorm}) as zeros: all
  of the checkpoint that predicting reads (the optimizer state is left on disk)."""
  import jax
  import jax.numpy as jnp
  size = config.data.image_size
  shapes = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                         jnp.zeros((1, size, size, 3), jnp.float32), train=False))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))


def restore(workdir: str, config, model) -> tuple[dict, str, dict]:
  """(variables, 'best' | 'latest', meta) of the run's best checkpoint, else its latest."""
  from flowers_jax import checkpoint
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise PredictError(f'{workdir} has no checkpoints/ (was it run with '
                       'train.checkpoint=False?)')
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    target = restore_target(config, model)
    parts = tuple(target)
    for kind, fn in (('best', ckpt.restore_best), ('latest', ckpt.restore_latest)):
      try:
        restored = fn(target, parts=parts)
      # A checkpoint of another model than config.json's, or a damaged one.
      except (ValueError, checkpoint.CheckpointDamagedError) as e:
        raise PredictError(str(e).splitlines()[0]) from None
      if restored is not None:
        variables, meta = restored
        return variables, kind, meta
  finally:
    ckpt.close()
  raise PredictError(f'{workdir}/checkpoints has neither a best nor a latest checkpoint')


def load_run(workdir: str, *, quiet: bool = False) -> Run:
  """Restores `workdir`'s best (else latest) checkpoint; see `Run`."""
  from flowers_jax import train
  config = load_config(workdir)
  model = train.create_model(config)
  variables, kind, meta = restore(workdir, config, model)
  if kind != 'best' and not quiet:
    print(f'note: {workdir} has no best checkpoint yet; using the latest one '
          f'(epoch {meta.get("epoch", "?")})', file=sys.stderr)
  names, where = class_names(workdir, config)
  return Run(workdir, config, model, variables, kind, meta, names, where)


# ----------------------------------------------------------------- images


def _walk_visible(root: str):
  """os.walk without hidden directories (.git, .thumbnails, .ipynb_checkpoints, ...)."""
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if not x.startswith('.'))
    yield d, dirs, files


def expand_paths(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Files named, and image files under directories named: (paths, [(arg, error)])."""
  paths, errors = [], []
  for a in args:
    if os.path.isdir(a):
      found = sorted(os.path.join(d, f) for d, _, files in _walk_visible(a) for f in files
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
      if not found:
        errors.append((a, f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in this directory'))
      paths += found
    elif os.path.isfile(a):
      paths.append(a)
    else:
      errors.append((a, 'no such file or directory'))
  return paths, errors


def _read_error(path: str) -> str | None:
  from flowers_jax.data import sources
  try:
    with open(path, 'rb') as f:
      sources.image_header(f.read())
  except OSError as e:
    return f'cannot read the file ({e.strerror or e})'
  except ValueError as e:  # PIL's "cannot identify image file <_io.BytesIO ...>" says little
    return ('not an image file (unknown format or corrupt header)'
            if 'UnidentifiedImageError' in str(e) else str(e))
  return None


def readable(paths: Sequence[str]):
  """(Split of the images that decode, [(path, error)] of the others). Each is decoded once
  to find truncated files; the pixels are dropped: `eval_batches` reads the files again."""
  from flowers_jax.data import pipeline, sources
  errors, good = [], []
  for p in paths:
    e = _read_error(p)
    (errors.append((p, e)) if e else good.append(p))
  split = sources.Split(np.arange(len(good), dtype=np.int64), np.zeros(len(good), np.int32),
                        list(good), paths=list(good))
  _, bad = pipeline.decode_all(split, threads=0, skip_errors=True)
  errors += [(good[i], 'not decodable (truncated or corrupt image data)') for i in bad]
  return split.select(np.setdiff1d(np.arange(len(good)), bad)), errors


def eval_batches(config, split, batch: int):
  """The run's eval transform over the files of `split`, read and decoded by tf.data (a
  store of decoded arrays would be kept alive by TensorFlow's numpy_function registry).

  Yields (positions [b], uint8 [b, S, S, 3]: `Run.logits` normalises them)."""
  from flowers_jax.data import dataset, pipeline, samplers
  cfg = dataset.DataConfig.parse(config.data)
  plan = samplers.eval_plan(len(split), batch)
  store = pipeline.ImageStore(split, 'files')
  ds = pipeline.eval_dataset(store, plan, cfg, cache=False)
  for row, b in zip(plan['index'], pipeline.iterate(ds, split, plan)):
    n = int(b['mask'].sum())
    yield row[:n], b['image']


def top_k(probs: np.ndarray, names: Sequence[str], k: int) -> list[dict]:
  """probs [C] -> [{'class', 'index', 'probability'}] * k, most probable first."""
  order = np.argsort(-probs, kind='stable')[:k]
  return [{'class': names[i], 'index': int(i), 'probability': float(probs[i])} for i in order]


def predict_files(run: Run, paths: Sequence[str], top: int = 5, batch: int = 32
                  ) -> tuple[list[dict], list[tuple[str, str]]]:
  """([{'path', 'top': top_k(...)}] in input order, [(path, error)] of skipped images).

  Images are read `batch` files at a time, so memory stays flat in the number of files
  (a decoded 2400x1600 photo is 11 MiB; 64 of them took 0.7 GB more than 4 when all were
  decoded first)."""
  import scipy.special
  results, errors = [], []
  for start in range(0, len(paths), batch):
    split, bad = readable(paths[start:start + batch])
    errors += bad
    if not len(split):
      continue
    for rows, x in eval_batches(run.config, split, batch):
      probs = scipy.special.softmax(run.logits(x)[:len(rows)], axis=-1)
      results += [{'path': split.paths[i], 'top': top_k(p, run.class_names, top)}
                  for i, p in zip(rows, probs)]
  order = {p: i for i, p in enumerate(paths)}
  return sorted(results, key=lambda r: order[r['path']]), errors


# ----------------------------------------------------------------- command line


def format_text(results: Sequence[dict]) -> str:
  lines = []
  for r in results:
    lines.append(r['path'])
    lines += [f'  {t["probability"]:7.2%}  {t["class"]}' for t in r['top']]
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m flowers_jax.predict',
      description='Top-k class names for images, from a run\'s best checkpoint.')
  parser.add_argument('--workdir', required=True, help='a run directory of flowers_jax.main')
  parser.add_argument('images', nargs='+', metavar='IMAGE_OR_DIR')
  parser.add_argument('--top', type=int, default=5, help='classes per image (default 5)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--batch', type=int, default=32, help='images per forward pass')
  args = parser.parse_args(argv)
  if args.top < 1 or args.batch < 1:
    parser.error('--top and --batch must be positive')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    paths, errors = expand_paths(args.images)
    run = load_run(args.workdir)
    results, bad = predict_files(run, paths, args.top, args.batch) if paths else ([], [])
  except PredictError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  errors += bad
  for path, why in errors:
    print(f'skipped {path}: {why}', file=sys.stderr)
  if args.json:
    print(json.dumps({'workdir': args.workdir, 'checkpoint': run.checkpoint,
                      'epoch': run.meta.get('epoch'), 'class_names_from': run.names_from,
                      'predictions': results,
                      'errors': [{'path': p, 'error': e} for p, e in errors]}, indent=2))
  elif results:
    print(format_text(results))
  if not results:
    print('error: no image could be predicted', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
