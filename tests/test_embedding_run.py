"""`vit_b16.py:tcel` through the CLI writes embedding metrics next to classification accuracy,
and they are the k-NN accuracy / recall@K of the best checkpoint's pre-logits, computed here."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from flowers_jax import data, normalization, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDING_KEYS = ('knn_accuracy', 'recall_at_1', 'recall_at_5')


def _embeddings(run, ds, split):
  """(pre_logits [N, D] float64, labels [N]) of every example of `split`, with numpy."""
  apply = jax.jit(lambda v, x: run.model.apply(v, x, train=False)[1]['pre_logits'])
  embs, labels = [], []
  for batch in ds.eval_batches(split, 8):  # the run's eval batch
    real = batch['mask'] > 0
    images = normalization.normalize(batch['image'], ds.config.mean, ds.config.std)
    embs.append(np.asarray(apply(run.variables, images), np.float64)[real])
    labels.append(batch['label'][real])
  return np.concatenate(embs), np.concatenate(labels)


def _knn_metrics(queries, query_labels, reference, reference_labels, k):
  dist = np.linalg.norm(queries[:, None] - reference[None], axis=-1)
  neighbours = reference_labels[np.argsort(dist, axis=1, kind='stable')]

  def vote(labels):  # the majority; a tie goes to the tied label of the nearest neighbour
    counts = np.bincount(labels)
    return next(label for label in labels if counts[label] == counts.max())

  return {'knn_accuracy': np.mean([vote(n[:k]) == t for n, t in zip(neighbours, query_labels)]),
          'recall_at_1': np.mean(neighbours[:, 0] == query_labels),
          'recall_at_5': np.mean((neighbours[:, :5] == query_labels[:, None]).any(1))}


def test_vit_tcel_writes_knn_and_recall_for_validation_and_test(tmp_path):
  data_dir, workdir = str(tmp_path / 'flowers'), str(tmp_path / 'run')
  data.make_fake_flowers(data_dir, num_classes=4, per_class=12, image_size=40, seed=0,
                         splits=(0.5, 0.25))
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  proc = subprocess.run(
      [sys.executable, '-m', 'flowers_jax.main', '--config', 'configs/vit_b16.py:tcel',
       '--workdir', workdir, f'--config.data.dir={data_dir}', '--config.model.num_classes=4',
       '--config.data.image_size=32', '--config.train.epochs=1',
       '--config.train.max_steps_per_epoch=2', '--config.train.batch_size=8',
       '--config.train.eval_batch_size=8', '--config.evals.knn_k=3',
       '--config.optim.warmup_steps=0'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert len(rows) == 1
  for row in rows:
    assert row['val_loss'] > 0, row
    for k in ('accuracy', *EMBEDDING_KEYS):
      assert 0 <= row[f'val_{k}'] <= 1, (k, row)
  assert rows[results['best_epoch'] - 1]['val_accuracy'] == results['best_val_accuracy']

  run = predict.load_run(workdir, quiet=True)
  ds = data.build(run.config.data, seed=run.config.seed, process_index=0, process_count=1)
  train_emb = _embeddings(run, ds, 'train')
  expected = {
      'val': _knn_metrics(*_embeddings(run, ds, 'validation'), *train_emb, k=3),
      'test': _knn_metrics(*_embeddings(run, ds, 'test'), *train_emb, k=3)}
  best_row = rows[results['best_epoch'] - 1]
  for k in EMBEDDING_KEYS:
    assert results[f'test_{k}'] == expected['test'][k], (k, results, expected)
    assert best_row[f'val_{k}'] == expected['val'][k], (k, best_row, expected)
  print({k: results[f'test_{k}'] for k in ('accuracy', *EMBEDDING_KEYS)})
