"""Figures: accuracy curves by step (like the study's figures 4, 6 and 10), confusion matrices."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_curves(history: Sequence[dict], path: str, title: str = '') -> None:
  """Writes train and validation accuracy against the step (`metrics.jsonl` rows) to a PNG."""
  plt = _pyplot()
  epochs = [r['step'] for r in history]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(epochs, [r['train_accuracy'] for r in history], 'o-', label='train')
  ax.plot(epochs, [r['val_accuracy'] for r in history], 's-', label='validation')
  ax.set_xlabel('step')
  ax.set_ylabel('accuracy')
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str,
                   title: str = '') -> None:
  """Writes a confusion matrix (int [C, C], rows true class, columns predicted) to a PNG, each
  row normalised by its class's count; class names label the axes when C <= 30."""
  plt = _pyplot()
  rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  n = len(class_names)
  size = min(4 + 0.12 * n, 16)
  fig, ax = plt.subplots(figsize=(size, size))
  image = ax.imshow(rows, cmap='viridis', vmin=0, vmax=1, interpolation='nearest')
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  if n <= 30:
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
