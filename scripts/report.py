r"""A Markdown report of a directory of runs, beside the study's numbers.

  python scripts/report.py RUNS [--out docs/my_report] [--pairs 5] [--no-confusion]

Reads every `RUNS/<run>/` that `flowers_jax.main` wrote (config.json, results.json,
metrics.jsonl) and writes into `--out` (default `RUNS/report`):

  report.md              one table: model, variant, best val, test, the study's test accuracy
                         and our difference, test top-5, k-NN / recall@1 (results.json keys
                         `test_knn_accuracy`, `test_recall_at_1`, blank where not measured),
                         steps, images seen, epochs, validations, wall time, train img/s; then
                         each model's most confused pairs
  curves_<model>.png     train and validation accuracy against images seen (`--x images`,
                         the default: a 500-step run of batch 512 and a 20-epoch run of batch
                         32 share the axis), `--x steps` or `--x epochs`, one line per variant
                         (like the study's figures 4, 6 and 10)

The confused pairs are those of each model's best run (by validation accuracy), from
`RUN/confusion_test.npy` (int [C, C], rows = true class, columns = predicted) when present,
else computed by running the run's best checkpoint over its test split (flowers_jax.predict's
restoring) and saved there for the next time.

Study numbers (`STUDY_TEST`): README.md "What to expect". A variant that improves on a study
variant is compared with it (`COMPARED_WITH`: eca_spatial with eca, tcel_hard with tcel, ...);
`strong` with the study's best test accuracy for that model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

MODELS = ('efficientnet_b0', 'vit_b16', 'resnet18')  # the study's order
TITLES = {'efficientnet_b0': 'EfficientNet-B0', 'vit_b16': 'ViT-B/16', 'resnet18': 'ResNet18'}
STUDY_TEST = {
    ('efficientnet_b0', 'frozen'): 0.836, ('efficientnet_b0', 'finetune'): 0.879,
    ('efficientnet_b0', 'eca'): 0.879,
    ('vit_b16', 'frozen'): 0.855, ('vit_b16', 'finetune'): 0.646, ('vit_b16', 'tcel'): 0.876,
    ('resnet18', 'frozen'): 0.801, ('resnet18', 'finetune'): 0.873,
    ('resnet18', 'deform_parallel_conv1'): 0.731, ('resnet18', 'deform_after_conv1'): 0.565,
}
COMPARED_WITH = {
    'eca_spatial': 'eca', 'tcel_hard': 'tcel',
    'deform_after_conv1_pretrained_init': 'deform_after_conv1',
    'deform_parallel_conv1_pretrained_init': 'deform_parallel_conv1',
}
VARIANT_ORDER = ('frozen', 'finetune', 'eca', 'eca_spatial', 'triplet', 'tcel', 'tcel_hard',
                 'deform_after_conv1', 'deform_parallel_conv1', 'deform_every_stage',
                 'deform_after_conv1_pretrained_init', 'deform_parallel_conv1_pretrained_init',
                 'deform_every_stage_pretrained_init', 'strong')


# ----------------------------------------------------------------- reading runs


def _json(path: str):
  with open(path) as f:
    return json.load(f)


def _jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_runs(root: str) -> tuple[list[dict], list[str]]:
  """([{'name', 'dir', 'config', 'results', 'history'}] of finished runs, unfinished names)."""
  runs, unfinished = [], []
  for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.isfile(os.path.join(d, 'config.json')):
      continue
    if not os.path.isfile(os.path.join(d, 'results.json')):
      unfinished.append(name)
      continue
    config = _json(os.path.join(d, 'config.json'))
    runs.append({'name': name, 'dir': d, 'config': config,
                 'results': _json(os.path.join(d, 'results.json')),
                 'history': _jsonl(os.path.join(d, 'metrics.jsonl')),
                 'model': config['model']['name'], 'variant': config.get('variant', '')})
  runs.sort(key=_order)
  return runs, unfinished


def _rank(seq, x) -> int:
  return seq.index(x) if x in seq else len(seq)


def _order(run: dict):
  return (_rank(MODELS, run['model']), run['model'], _rank(VARIANT_ORDER, run['variant']),
          run['variant'], run['name'])


# ----------------------------------------------------------------- the table


def study_reference(model: str, variant: str) -> tuple[float | None, str]:
  """(the study's test accuracy to compare with, which study variant it is)."""
  if (model, variant) in STUDY_TEST:
    return STUDY_TEST[model, variant], variant
  if variant in COMPARED_WITH and (model, COMPARED_WITH[variant]) in STUDY_TEST:
    return STUDY_TEST[model, COMPARED_WITH[variant]], COMPARED_WITH[variant]
  if variant == 'strong':
    best = max((v, k[1]) for k, v in STUDY_TEST.items() if k[0] == model)
    return best[0], f'best: {best[1]}'
  return None, ''


def _f(x, fmt='{:.3f}') -> str:
  return '' if x is None else fmt.format(x)


def _hms(seconds) -> str:
  if seconds is None:
    return ''
  s = int(round(seconds))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


COLUMNS = ('model', 'variant', 'best val', 'test', 'study test', 'Δ test', 'test top-5',
           'k-NN', 'recall@1', 'steps', 'images seen', 'epochs', 'validations', 'wall time',
           'train img/s')
# --x: the metrics.jsonl key plotted on the x axis, and its label.
X_AXES = {'images': ('images_seen', 'images seen'), 'steps': ('step', 'step'),
          'epochs': ('epoch', 'epoch')}


def table_row(run: dict) -> list[str]:
  r = run['results']
  study, which = study_reference(run['model'], run['variant'])
  test = r.get('test_accuracy')
  diff = None if study is None or test is None else test - study
  study_cell = '' if study is None else (
      f'{study:.3f}' if which == run['variant'] else f'{study:.3f} ({which})')
  epochs = r.get('epochs') or len(run['history'])
  count = lambda key: '' if r.get(key) is None else str(r[key])
  return [run['model'], run['variant'], _f(r.get('best_val_accuracy')), _f(test), study_cell,
          _f(diff, '{:+.3f}'), _f(r.get('test_top5')), _f(r.get('test_knn_accuracy')),
          _f(r.get('test_recall_at_1')), count('steps'), count('images_seen'),
          str(epochs or ''), str(r.get('validations') or len(run['history']) or ''),
          _hms(r.get('wall_time_s')),
          _f(r.get('train_images_per_s'), '{:.1f}')]


def markdown_table(header, rows) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def data_summary(runs: list[dict]) -> list[str]:
  """One line per distinct (data source, dir, image size, test images) of the runs."""
  seen = {}
  for run in runs:
    d = run['config']['data']
    key = (d['source'], os.path.basename(os.path.normpath(d['dir'] or '.')), d['image_size'],
           run['results'].get('test_examples'))
    seen.setdefault(key, []).append(run['name'])
  return [f'- data.source={s}, data.dir=.../{name}, {size} px, {n} test images: '
          f'{len(names)} run(s)' for (s, name, size, n), names in seen.items()]


# ----------------------------------------------------------------- figures


MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*')
LINESTYLES = ('-', '--', '-.', ':')


def plot_model(model: str, runs: list[dict], path: str, x: str = 'images') -> None:
  """Train (left) and validation (right) accuracy against `X_AXES[x]`, one line per variant
  (rows without that key, from runs before it was written, are left out)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True, layout='constrained')
  colors = plt.get_cmap('tab10')
  for i, run in enumerate(runs):
    key = X_AXES[x][0]
    h = [row for row in run['history'] if key in row]
    epochs = [row[key] for row in h]
    # Equal curves (short runs) stay visible: markers shrink and line styles change per variant.
    style = dict(color=colors(i % 10), marker=MARKERS[i % len(MARKERS)],
                 markersize=max(3, 10 - 1.5 * i), linestyle=LINESTYLES[i % len(LINESTYLES)],
                 alpha=0.85, label=run['variant'])
    axes[0].plot(epochs, [row['train_accuracy'] for row in h], **style)
    axes[1].plot(epochs, [row['val_accuracy'] for row in h], **style)
  for ax, what in zip(axes, ('train', 'validation')):
    ax.set_title(f'{TITLES.get(model, model)}: {what} accuracy')
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
  axes[0].set_ylabel('accuracy')
  fig.legend(*axes[0].get_legend_handles_labels(), loc='outside lower center',
             ncol=min(len(runs), 4), fontsize=9, frameon=False)
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------- confusion


def test_confusion(run_dir: str) -> tuple[np.ndarray, tuple[str, ...]]:
  """(int [C, C] counts, rows true / columns predicted; class names) of the best checkpoint."""
  from flowers_jax import data, predict
  cached = os.path.join(run_dir, 'confusion_test.npy')
  config = predict.load_config(run_dir)
  if os.path.isfile(cached):
    return np.load(cached), predict.class_names(run_dir, config)[0]
  run = predict.load_run(run_dir, quiet=True)
  ds = data.build(run.config.data, seed=run.config.seed, process_index=0, process_count=1)
  n = run.config.model.num_classes
  confusion = np.zeros((n, n), np.int64)
  for batch in ds.eval_batches('test', int(run.config.train.eval_batch_size)):
    pred = run.logits(batch['image']).argmax(-1)
    real = batch['mask'] > 0
    np.add.at(confusion, (batch['label'][real], pred[real]), 1)
  try:
    np.save(cached, confusion)
  except OSError:
    pass
  return confusion, run.class_names


def confused_pairs(confusion: np.ndarray, names, k: int) -> list[tuple[str, str, int, int]]:
  """The k largest off-diagonal counts: [(true name, predicted name, count, true total)]."""
  off = confusion.copy()
  np.fill_diagonal(off, 0)
  flat = np.argsort(-off, axis=None, kind='stable')[:k]
  pairs = []
  for t, p in zip(*np.unravel_index(flat, off.shape)):
    if off[t, p] > 0:
      pairs.append((names[t], names[p], int(off[t, p]), int(confusion[t].sum())))
  return pairs


def confusion_section(model: str, runs: list[dict], k: int) -> list[str]:
  best = max(runs, key=lambda r: (r['results'].get('best_val_accuracy') or -1,
                                  r['results'].get('test_accuracy') or -1))
  head = f'### {TITLES.get(model, model)}: {best["variant"]} (best validation accuracy)'
  try:
    confusion, names = test_confusion(best['dir'])
  except Exception as e:  # no data, no checkpoint, ...
    return [head, '', f'not computed: {str(e).splitlines()[0] if str(e) else type(e).__name__}',
            '']
  pairs = confused_pairs(confusion, names, k)
  if not pairs:
    return [head, '', f'no test image of its {int(confusion.sum())} is misclassified.', '']
  rows = [[t, p, f'{n} of {total}'] for t, p, n, total in pairs]
  return [head, '', markdown_table(('true class', 'predicted as', 'test images'), rows), '']


# ----------------------------------------------------------------- the report


def write_report(root: str, out: str, pairs: int = 5, confusion: bool = True,
                 x: str = 'images') -> str:
  """Writes report.md and one PNG per model into `out`; returns the Markdown."""
  runs, unfinished = read_runs(root)
  if not runs:
    raise FileNotFoundError(f'no finished run (a directory with results.json) in {root}')
  os.makedirs(out, exist_ok=True)
  by_model: dict[str, list[dict]] = {}
  for run in runs:
    by_model.setdefault(run['model'], []).append(run)
  md = [f'# Runs in `{os.path.basename(os.path.normpath(root))}`', '',
        f'{len(runs)} finished run(s); the study\'s numbers are its test accuracies on '
        'Flowers102 (6149 test images, 224 px, README.md "What to expect"), Δ = ours − study.',
        *data_summary(runs)]
  if unfinished:
    md.append(f'- unfinished (no results.json): {", ".join(unfinished)}')
  md += ['', markdown_table(COLUMNS, [table_row(r) for r in runs]), '',
         f'## Train and validation accuracy against {X_AXES[x][1]}', '']
  for model, model_runs in by_model.items():
    png = f'curves_{model}.png'
    plot_model(model, model_runs, os.path.join(out, png), x)
    md += [f'![{TITLES.get(model, model)}]({png})', '']
  if confusion:
    md += ['## Most confused classes on the test split', '']
    for model, model_runs in by_model.items():
      md += confusion_section(model, model_runs, pairs)
  text = '\n'.join(md).rstrip() + '\n'
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write(text)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', help='a directory of run directories (run_experiments.py --out)')
  parser.add_argument('--out', help='where report.md and the PNGs go (default RUNS/report)')
  parser.add_argument('--pairs', type=int, default=5, help='confused pairs per model')
  parser.add_argument('--no-confusion', action='store_true',
                      help='skip the confused pairs (they may run the test split)')
  parser.add_argument('--x', choices=sorted(X_AXES), default='images',
                      help='the curves\' x axis (default: images seen)')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not os.path.isdir(args.runs):
    print(f'error: {args.runs} is not a directory', file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.runs, 'report')
  try:
    write_report(args.runs, out, args.pairs, not args.no_confusion, args.x)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  pngs = sorted(f for f in os.listdir(out) if f.startswith('curves_') and f.endswith('.png'))
  print(f'wrote {os.path.join(out, "report.md")}, {", ".join(pngs)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
