"""Figures: per-epoch train / validation accuracy curves, like the study's figures 4, 6 and 10."""

from __future__ import annotations

from typing import Sequence


def plot_curves(history: Sequence[dict], path: str, title: str = '') -> None:
  """Writes train and validation accuracy per epoch (`metrics.jsonl` rows) to a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  epochs = [r['epoch'] for r in history]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(epochs, [r['train_accuracy'] for r in history], 'o-', label='train')
  ax.plot(epochs, [r['val_accuracy'] for r in history], 's-', label='validation')
  ax.set_xlabel('epoch')
  ax.set_ylabel('accuracy')
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
