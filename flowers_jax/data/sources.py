"""Sources: where the examples come from, as lists of (id, label, file or bytes).

A reader turns ``config.data.dir`` into a ``Source``: per split, example ids,
0-based labels and either file paths or encoded image bytes. No pixels are
decoded here (``check_headers`` only reads image headers).

- ``tfds``: ``tfds.builder('oxford_flowers102', data_dir=dir)``; splits train /
  validation / test; id parsed from ``file_name`` (``image_00042.jpg`` -> 42).
  Prepared with ``download_and_prepare`` when needed (needs network).
- ``folder``: the raw Oxford layout ``dir/jpg/image_%05d.jpg``, ``imagelabels.mat``
  (``labels`` [1, N], 1-based), ``setid.mat`` (``trnid`` / ``valid`` / ``tstid``
  -> train / validation / test, 1-based image ids); id = the image number.
- ``imagefolder``: ``dir/<split>/<class_name>/*.jpg|jpeg|png`` with splits train,
  validation (or val), test; classes are train's sub-folders, sorted; ids are the
  positions in the sorted file list of the split.

tfds and folder splits are sorted by id, so the two sources of the same files give
the same examples in the same order, hence the same batches for the same seed.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
import os
import re
import sys
from typing import Callable

import numpy as np

from flowers_jax.data import flowers102

SPLITS = ('train', 'validation', 'test')
IMAGE_FORMATS = ('JPEG', 'PNG', 'BMP', 'GIF')  # what tf.io.decode_image reads
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')

_FOLDER_LAYOUT = (
    "expected the raw Flowers102 layout: DIR/jpg/image_00001.jpg ..., "
    "DIR/imagelabels.mat (key 'labels', 1-based, shape [1, N]) and DIR/setid.mat "
    "(keys 'trnid', 'valid', 'tstid': 1-based image ids); "
    "make one with scripts/make_fake_flowers.py")
_IMAGEFOLDER_LAYOUT = (
    'expected DIR/<split>/<class_name>/*.jpg|jpeg|png with split train, '
    'validation (or val) and test')


@dataclasses.dataclass
class Split:
  """The examples of one split, in a fixed order (positions 0..N-1).

  Attributes:
    ids: int64 [N], the example ids (Flowers102 image numbers for tfds/folder).
    labels: int32 [N], 0-based.
    names: N strings naming each example in messages (file path or file name).
    paths: N file paths, or None when the bytes are in ``encoded``.
    encoded: N encoded images (bytes), or None.
  """
  ids: np.ndarray
  labels: np.ndarray
  names: list[str]
  paths: list[str] | None = None
  encoded: list[bytes] | None = None

  def __len__(self):
    return len(self.ids)

  def read(self, i: int) -> bytes:
    if self.encoded is not None:
      return self.encoded[i]
    with open(self.paths[i], 'rb') as f:
      return f.read()

  def select(self, keep: np.ndarray) -> 'Split':
    """The sub-split at positions ``keep`` (int [M])."""
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]
    return Split(self.ids[keep], self.labels[keep], pick(self.names),
                 pick(self.paths), pick(self.encoded))


@dataclasses.dataclass
class Source:
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  splits: dict[str, Split]


def default_class_names(num_classes: int) -> tuple[str, ...]:
  """The 102 Flowers102 names for 102 classes, else ``class_000``, ``class_001``, ..."""
  if num_classes == len(flowers102.CLASS_NAMES):
    return flowers102.CLASS_NAMES
  return tuple(f'class_{i:03d}' for i in range(num_classes))


def check_labels(source: Source) -> None:
  for split_name, split in source.splits.items():
    bad = (split.labels < 0) | (split.labels >= source.num_classes)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(
          f'Label out of range in {source.name} split {split_name!r}: example'
          f' {split.names[i]} has label {int(split.labels[i])} (0-based), valid'
          f' labels are 0..{source.num_classes - 1}; {int(bad.sum())} such examples.')


# ---------------------------------------------------------------- folder


def _loadmat(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  import scipy.io
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Missing {os.path.basename(path)} in'
                            f' {os.path.dirname(path)}: {_FOLDER_LAYOUT}.')
  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # scipy raises several types for non-.mat files.
    raise ValueError(f'Cannot read {path} as a MATLAB .mat file ({e}): {_FOLDER_LAYOUT}.'
                     ) from e
  missing = [k for k in keys if k not in mat]
  if missing:
    found = sorted(k for k in mat if not k.startswith('__'))
    raise ValueError(f'{path} lacks key(s) {missing} (has {found}): {_FOLDER_LAYOUT}.')
  return {k: np.asarray(mat[k]).reshape(-1).astype(np.int64) for k in keys}


def read_folder(root: str) -> Source:
  """The raw Oxford layout (see module docstring)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Data directory {root!r} does not exist: {_FOLDER_LAYOUT}.')
  labels_1 = _loadmat(os.path.join(root, 'imagelabels.mat'), ('labels',))['labels']
  setid = _loadmat(os.path.join(root, 'setid.mat'), tuple(flowers102.SETID_KEYS.values()))
  if labels_1.min() < 1:
    i = int(np.argmin(labels_1))
    raise ValueError(f'Label out of range in {root}/imagelabels.mat: image {i + 1} has'
                     f' label {labels_1[i]}, labels must be 1-based (1..num_classes).')
  num_classes = int(labels_1.max())
  splits = {}
  for split_name, key in flowers102.SETID_KEYS.items():
    ids = np.sort(setid[key])
    bad = (ids < 1) | (ids > len(labels_1))
    if bad.any():
      raise ValueError(
          f'{root}/setid.mat {key!r} has image id {ids[bad][0]}, but imagelabels.mat'
          f' labels images 1..{len(labels_1)}.')
    paths = [os.path.join(root, 'jpg', 'image_%05d.jpg' % i) for i in ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(
          f'Missing image {missing[0]} ({len(missing)} of the {len(paths)} images of'
          f' split {split_name!r} are missing): {_FOLDER_LAYOUT}.')
    splits[split_name] = Split(ids, (labels_1[ids - 1] - 1).astype(np.int32),
                               paths, paths=paths)
  return Source('folder', num_classes, default_class_names(num_classes), splits)


# ---------------------------------------------------------------- imagefolder


def _list_images(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(_IMAGE_EXTENSIONS) and not f.startswith('.'))


def read_imagefolder(root: str) -> Source:
  """``root/<split>/<class>/*.jpg`` (see module docstring)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Data directory {root!r} does not exist: {_IMAGEFOLDER_LAYOUT}.')
  dirs = {'train': ['train'], 'validation': ['validation', 'val'], 'test': ['test']}
  split_dirs = {}
  for split_name, candidates in dirs.items():
    found = [os.path.join(root, d) for d in candidates if os.path.isdir(os.path.join(root, d))]
    if found:
      split_dirs[split_name] = found[0]
  if 'train' not in split_dirs:
    raise FileNotFoundError(f'Missing {os.path.join(root, "train")}: {_IMAGEFOLDER_LAYOUT}.')
  class_names = tuple(sorted(d for d in os.listdir(split_dirs['train'])
                             if os.path.isdir(os.path.join(split_dirs['train'], d))))
  if not class_names:
    raise FileNotFoundError(f'No class folders in {split_dirs["train"]}: {_IMAGEFOLDER_LAYOUT}.')
  class_index = {c: i for i, c in enumerate(class_names)}
  splits = {}
  for split_name, split_dir in split_dirs.items():
    paths, labels = [], []
    for c in sorted(os.listdir(split_dir)):
      if not os.path.isdir(os.path.join(split_dir, c)):
        continue
      if c not in class_index:
        raise ValueError(f'Class folder {os.path.join(split_dir, c)} is not a class of the'
                         f' train split; train classes: {list(class_names)}.')
      files = _list_images(os.path.join(split_dir, c))
      paths += [os.path.join(split_dir, c, f) for f in files]
      labels += [class_index[c]] * len(files)
    splits[split_name] = Split(np.arange(len(paths), dtype=np.int64),
                               np.asarray(labels, np.int32), paths, paths=paths)
  return Source('imagefolder', len(class_names), class_names, splits)


# ---------------------------------------------------------------- tfds


def _id_from_file_name(file_name: str, position: int) -> int:
  m = re.search(r'(\d+)', file_name)
  return int(m.group(1)) if m else position


TFDS_DOWNLOAD_HOST = 'www.robots.ox.ac.uk'  # where TFDS's oxford_flowers102 downloads from


def _can_reach(host: str, port: int = 443, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to `host` opens within `timeout` s (TFDS would retry for minutes)."""
  import socket
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _check_tfds_reachable(data_dir: str, name: str) -> None:
  """Fails at once, before tensorflow is imported, when `name` is neither prepared on disk
  (``<data_dir>/<name>/<version>/dataset_info.json``) nor downloadable from here."""
  root = data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')
  if glob.glob(os.path.join(root, name, '*', 'dataset_info.json')):
    return
  if not _can_reach(TFDS_DOWNLOAD_HOST):
    raise FileNotFoundError(
        f'TFDS {name} is not prepared in {root!r} and this machine cannot reach '
        f'{TFDS_DOWNLOAD_HOST} to download it; prepare it where there is network, or download'
        ' the raw files (jpg/, imagelabels.mat, setid.mat) and use'
        ' --config.data.source=folder --config.data.dir=<their directory>')


def read_tfds(data_dir: str, name: str = 'oxford_flowers102') -> Source:
  """TFDS ``oxford_flowers102`` with undecoded image bytes, held in memory."""
  if 'tensorflow_datasets' not in sys.modules:  # else its import is paid (or mocked in tests)
    _check_tfds_reachable(data_dir, name)
  from flowers_jax.data import pipeline
  pipeline.import_tf()
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir or None)
  try:
    if not builder.is_prepared():
      builder.download_and_prepare()
  except Exception as e:
    raise FileNotFoundError(
        f'TFDS {name} is not prepared in data_dir={builder.data_dir!r} and could not be'
        f' downloaded ({type(e).__name__}: {e}); prepare it where there is network, or'
        f" use config.data.source='folder' with the raw files.") from e
  num_classes = builder.info.features['label'].num_classes
  names = tuple(builder.info.features['label'].names)
  splits = {}
  for split_name in SPLITS:
    ds = builder.as_dataset(split=split_name, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    encoded, labels, file_names = [], [], []
    for ex in ds.as_numpy_iterator():
      encoded.append(ex['image'])
      labels.append(ex['label'])
      file_names.append(ex['file_name'].decode() if 'file_name' in ex else '')
    ids = [_id_from_file_name(f, i) for i, f in enumerate(file_names)]
    if len(set(ids)) != len(ids):  # e.g. mock data: file names without unique numbers.
      ids = list(range(len(ids)))
    split = Split(
        np.asarray(ids, np.int64), np.asarray(labels, np.int32).reshape(-1),
        [f'{name}/{split_name}[{i}] {f}' for i, f in enumerate(file_names)],
        encoded=encoded)
    splits[split_name] = split.select(np.argsort(split.ids, kind='stable'))
  return Source('tfds', num_classes, names or default_class_names(num_classes), splits)


READERS: dict[str, Callable[[str], Source]] = {
    'tfds': read_tfds,
    'folder': read_folder,
    'imagefolder': read_imagefolder,
}


def read(source: str, data_dir: str) -> Source:
  if source not in READERS:
    raise ValueError(f'Unknown data source {source!r}; valid: {sorted(READERS)}.')
  src = READERS[source](os.path.expanduser(data_dir or ''))
  check_labels(src)
  return src


# ---------------------------------------------------------------- headers


def image_header(data: bytes) -> tuple[str, int, int]:
  """(format, height, width) from an encoded image's header; ValueError if not an image."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt, (width, height) = im.format, im.size
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
    raise ValueError(f'not a readable image ({type(e).__name__}: {e})') from e
  if fmt not in IMAGE_FORMATS:
    raise ValueError(f'image format {fmt} is not one of {IMAGE_FORMATS}')
  return fmt, height, width


def check_headers(split: Split) -> tuple[np.ndarray, list[int]]:
  """Reads every header: (decoded sizes int64 [N] in bytes (H*W*3, 0 if bad), bad positions)."""
  sizes = np.zeros(len(split), np.int64)
  bad = []
  for i in range(len(split)):
    try:
      _, h, w = image_header(split.read(i))
      sizes[i] = h * w * 3
    except ValueError:
      bad.append(i)
  return sizes, bad


def corrupt_error(split: Split, i: int, reason: str) -> ValueError:
  return ValueError(
      f'Corrupt image {split.names[i]} (id {int(split.ids[i])}): {reason}. Replace or'
      ' delete the file, or set config.data.skip_corrupt=True to skip such files.')


def drop_corrupt(split_name: str, split: Split, bad: list[int]) -> Split:
  if not bad:
    return split
  logging.warning('Skipping %d corrupt image(s) of split %r: %s', len(bad), split_name,
                  ', '.join(split.names[i] for i in bad[:10]) + (' ...' if len(bad) > 10 else ''))
  keep = np.setdiff1d(np.arange(len(split)), bad)
  return split.select(keep)
