"""Weights specs: which file holds pretrained weights, in which format, with which preprocessing.

    source = weights.resolve('timm:vit_base_patch16_224.augreg_in21k')   # -> Source
    weights.preprocessing('vit_b16', 'timm:/data/vit_augreg')            # -> dict | None
    convert.load_weights('vit_b16', 'timm:/data/vit_augreg', num_classes=102)  # the loader

Spec grammar (a string or os.PathLike)
--------------------------------------
  torchvision:PATH   a torchvision state_dict (.pth / .pt / .bin via torch.load, or .safetensors)
                     or a directory written by scripts/convert_torchvision.py
  timm:DIR           a Hugging Face layout directory: model.safetensors (else pytorch_model.bin,
                     `WEIGHT_FILES`) with timm's config.json beside it, as
                     `timm.models._hub.save_for_hf(model, DIR, safe_serialization=True)` writes it
                     or a Hub snapshot holds it (config: 'architecture', optional 'model_args',
                     'pretrained_cfg')
  timm:FILE          a bare timm state_dict (.safetensors / .pth / .bin); a config.json beside it
                     is read as for DIR, else the architecture is taken to be timm's default for
                     the model trained (`DEFAULT_ARCHITECTURE`) and checked from the keys only
  timm:NAME          a timm model on the Hub, 'vit_base_patch16_224.augreg_in21k' (repo timm/NAME;
                     'org/repo' or 'hf-hub:org/repo' for other owners): the snapshot in the local
                     Hugging Face cache (`hf_cache_dir`), downloaded only when not offline
                     (HF_HUB_OFFLINE unset) and huggingface_hub is installed; an untagged NAME
                     ('resnet18') takes the one cached tag. Not found: a FileNotFoundError saying
                     where to put the files
  timm:NAME:FILE     FILE, with NAME's preprocessing (cached config.json, else timm's registry)
  PATH               recognised by its contents: a directory with timm's weights file (config.json
                     optional) -> timm; a converted checkpoint directory -> torchvision; a
                     .safetensors file -> timm or torchvision by its keys (`detect_format`); a
                     torch file -> decided by its keys once read (format 'auto')

Preprocessing (`preprocessing`, cheap: reads a config.json at most, never imports torch)
--------------------------------------------------------------------------------------
`{'mean': (r, g, b), 'std': (r, g, b), 'interpolation': 'bicubic', 'crop_pct': 0.9,
'input_size': (3, H, W), 'source': '<a sentence: where it came from>'}` from timm's
pretrained_cfg, or None where the weights carry none: torchvision weights (a state_dict holds no
preprocessing; torchvision's ImageNet weights use ImageNet mean/std, resize 256 / crop 224,
bilinear, except EfficientNet-B0's bicubic, i.e. the ImageNet defaults a caller falls back to)
and timm files without a config. Callers: explicit config values win, else this dict, else
ImageNet defaults.

timm -> torchvision keys (`timm_to_torchvision`)
----------------------------------------------
Per model family (`FAMILIES`): `rows`, (regex on the timm key, torchvision key template with the
regex's groups) tried in order, first match wins; a timm key no row maps is an error, never
dropped. The architecture must be in `ARCHITECTURES` (timm architecture -> our model, which must
be the model trained); others are refused (`REFUSED_ARCHITECTURES` names the difference), as are
timm `model_args` / config values that change the function (`Family.args`), keys that show a
different architecture (`Family.key_signs`: fc_norm, register tokens, layer scale, ...) and
model_args this file does not know. ViT position embeddings of another grid are resized as timm
does (`resize_pos_embed_timm`: PyTorch bicubic, antialias=True, align_corners=False, timm's
`resample_abs_pos_embed` in `checkpoint_filter_fn`), not torchvision's way (align_corners=True,
`models/vit.py`), so a timm checkpoint loaded at another size equals timm's own model built at
that size.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re
import struct
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from flowers_jax import models
from flowers_jax.models import efficientnet, vit

Array = np.ndarray

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
CONFIG_FILE = 'config.json'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.pth.tar')
WEIGHT_SUFFIXES = ('.safetensors',) + TORCH_SUFFIXES
CONVERTED_MARKER = '_CHECKPOINT_METADATA'  # orbax: a scripts/convert_torchvision.py directory
SPEC_FORMS = ('valid weights specs: torchvision:PATH (.pth or a scripts/convert_torchvision.py '
              'directory), timm:DIR (model.safetensors + config.json, as timm\'s save_for_hf '
              'writes), timm:FILE, timm:NAME (Hugging Face cache), or such a PATH')
# Keys of timm's ViT and EfficientNet (torchvision names these otherwise; ResNet's are the same).
TIMM_KEYS = re.compile(r'^(cls_token|pos_embed|patch_embed\.|blocks\.\d|conv_stem\.|conv_head\.)')
_NAME = re.compile(r'^(?:[\w.-]+/)?[\w.-]+$')
_TRUE = ('1', 'true', 'yes', 'on')


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved spec: what to read and how (`format` 'auto': decided from the keys once read)."""
  format: str                        # 'torchvision' | 'timm' | 'auto'
  path: str                          # weights file, or a converted-checkpoint directory
  config: Mapping[str, Any] | None = None   # timm's config.json
  config_path: str | None = None
  name: str | None = None            # timm model name given in the spec (NAME, NAME:FILE)

  def describe(self, fmt: str | None = None) -> str:
    """'timm weights /d/model.safetensors (config /d/config.json: resnet18.a1_in1k)'."""
    fmt = fmt or self.format
    about = [f'config {self.config_path}: {timm_name(self.config)}'] if self.config else []
    about += [f'timm name {self.name}'] if self.name and not self.config else []
    return f'{fmt} weights {self.path}' + (f' ({"; ".join(about)})' if about else '')


# --- spec -> Source ------------------------------------------------------------------------

def split_spec(spec) -> tuple[str | None, str]:
  """('timm', 'DIR') for 'timm:DIR', (None, 'PATH') for a bare path; ValueError for 'foo:...'."""
  text = os.fspath(spec)
  m = re.match(r'^([A-Za-z][\w-]+):(?!//)(.*)$', text)
  if m and m[1] in _RESOLVERS:
    return m[1], m[2]
  if m and not os.path.exists(text):
    raise ValueError(f'unknown weights format {m[1]!r} in {text!r}; {SPEC_FORMS}')
  return None, text


def resolve(spec, *, download: bool = True) -> Source:
  """The `Source` of a spec string (grammar in the module docstring).

  Raises FileNotFoundError (one line) for a path that does not exist or a timm NAME found
  neither in the Hugging Face cache nor, with `download`, on the Hub; ValueError for a bad spec.
  """
  prefix, rest = split_spec(spec)
  if not rest:
    raise ValueError(f'empty weights path in {os.fspath(spec)!r}; {SPEC_FORMS}')
  return _RESOLVERS[prefix](rest, download)


def _resolve_torchvision(path: str, download: bool) -> Source:
  del download
  _check_exists(path)
  return Source('torchvision', path)


def _resolve_bare(path: str, download: bool) -> Source:
  del download
  _check_exists(path)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, CONVERTED_MARKER)):
      return Source('torchvision', path)
    return _timm_directory(path)
  config, config_path = _config_beside(path)
  if config is not None:
    return Source('timm', path, config, config_path)
  if path.endswith('.safetensors'):
    return Source(detect_format(safetensors_shapes(path)), path)
  return Source('auto', path)


def _resolve_timm(rest: str, download: bool) -> Source:
  if os.path.isdir(rest):
    return _timm_directory(rest)
  if os.path.isfile(rest):
    return Source('timm', rest, *_config_beside(rest))
  name, sep, file = _strip_hub(rest).partition(':')
  if sep and _NAME.match(name):                               # NAME:FILE
    _check_exists(file)
    config, config_path = _config_beside(file)
    if config is None:
      config, config_path = _cached_config(name)
    return Source('timm', file, config, config_path, name=name)
  if not is_hub_name(rest):
    _check_exists(rest)
    raise ValueError(f'{rest!r} is neither a weights path nor a timm model name; {SPEC_FORMS}')
  name = _strip_hub(rest)
  return _timm_directory(_snapshot(name, download), name=name)


def is_hub_name(rest: str) -> bool:
  """Whether the text after 'timm:' names a Hub model (not an existing or a file path)."""
  name = _strip_hub(rest)
  return (not os.path.exists(rest) and not name.endswith(WEIGHT_SUFFIXES)
          and _NAME.match(name) is not None)


_RESOLVERS: dict[str | None, Callable[[str, bool], Source]] = {
    'torchvision': _resolve_torchvision, 'timm': _resolve_timm, None: _resolve_bare}


def _check_exists(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f'weights path {path} does not exist; {SPEC_FORMS}')


def _timm_directory(path: str, name: str | None = None) -> Source:
  """Source of a Hugging Face layout directory (its first `WEIGHT_FILES` file, config.json)."""
  files = [os.path.join(path, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
  if not files:
    raise FileNotFoundError(f'{path} holds no timm weights file ({" / ".join(WEIGHT_FILES)}) '
                            f'and is no converted checkpoint; {SPEC_FORMS}')
  config, config_path = _config_beside(files[0])
  return Source('timm', files[0], config, config_path, name=name)


def _config_beside(path: str) -> tuple[dict | None, str | None]:
  """timm's config.json in `path`'s directory (one with 'architecture'), else (None, None)."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
  if not os.path.isfile(config_path):
    return None, None
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{config_path} is not a readable JSON file ({type(e).__name__}: '
                     f'{_first_line(e)})') from None
  if not isinstance(config, dict) or not _architecture(config):
    return None, None  # a config.json of something else (e.g. transformers'), not timm's
  return config, config_path


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


# --- the Hugging Face cache ----------------------------------------------------------------

def hf_cache_dir() -> str:
  """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once,
  at import): HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub,
  ~/.cache/huggingface/hub."""
  for var in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  home = os.environ.get('HF_HOME') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'huggingface')
  return os.path.join(os.path.expanduser(home), 'hub')


def hf_offline() -> bool:
  """HF_HUB_OFFLINE set (read now, not at huggingface_hub's import)."""
  return os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in _TRUE


def _strip_hub(name: str) -> str:
  return name[len('hf-hub:'):] if name.startswith('hf-hub:') else name


def repo_id(name: str) -> str:
  """'vit_base_patch16_224.augreg_in21k' -> 'timm/vit_base_patch16_224.augreg_in21k'."""
  return name if '/' in name else f'timm/{name}'


def _repo_dir(repo: str, cache: str) -> str:
  return os.path.join(cache, 'models--' + repo.replace('/', '--'))


def _cached_snapshot(repo: str, cache: str) -> str | None:
  """The cached snapshot directory of `repo` holding a weights file (refs/main's, else newest)."""
  root = _repo_dir(repo, cache)
  ref = os.path.join(root, 'refs', 'main')
  snapshots = []
  if os.path.isfile(ref):
    with open(ref) as f:
      snapshots.append(os.path.join(root, 'snapshots', f.read().strip()))
  snapshots += sorted(glob.glob(os.path.join(root, 'snapshots', '*')), key=os.path.getmtime,
                      reverse=True)
  return next((s for s in snapshots
               if any(os.path.isfile(os.path.join(s, f)) for f in WEIGHT_FILES)), None)


def _cached_tags(name: str, cache: str) -> list[str]:
  """For an untagged timm name ('resnet18'): the cached 'resnet18.<tag>' names with weights."""
  found = glob.glob(os.path.join(cache, f'models--timm--{glob.escape(name)}.*'))
  names = sorted(os.path.basename(d)[len('models--timm--'):] for d in found)
  return [n for n in names if _cached_snapshot(repo_id(n), cache)]


def _snapshot(name: str, download: bool) -> str:
  """The local directory of timm model `name`: cached, else downloaded (when allowed)."""
  cache, repo = hf_cache_dir(), repo_id(name)
  found = _cached_snapshot(repo, cache)
  if found:
    return found
  if '/' not in name and '.' not in name:
    tags = _cached_tags(name, cache)
    if len(tags) == 1:
      return _cached_snapshot(repo_id(tags[0]), cache)
    if tags:
      raise ValueError(f'timm:{name} is ambiguous: the Hugging Face cache {cache} holds '
                       f'{", ".join(tags)}; name one (timm:{tags[0]})')
  if not download:
    raise _not_found(name, cache, 'not downloading')
  return _download(name, cache)


def _download(name: str, cache: str) -> str:
  """Downloads config.json and the weights of timm/NAME into `cache`; its snapshot directory."""
  if hf_offline():
    raise _not_found(name, cache, 'offline: HF_HUB_OFFLINE is set')
  try:
    import huggingface_hub
  except ImportError:
    raise _not_found(name, cache, 'huggingface_hub is not installed') from None
  get = lambda f: huggingface_hub.hf_hub_download(repo_id(name), f, cache_dir=cache)
  try:
    get(CONFIG_FILE)
  except Exception as e:  # no network, no such repo, ...
    reason = f'download failed: {type(e).__name__}: {_first_line(e)}'
    raise _not_found(name, cache, reason) from None
  for file in WEIGHT_FILES[:2]:
    try:
      return os.path.dirname(get(file))
    except Exception as e:  # EntryNotFound: try the next file name
      error = e
  raise _not_found(name, cache, f'download failed: {type(error).__name__}: {_first_line(error)}')


def _not_found(name: str, cache: str, reason: str) -> FileNotFoundError:
  repo = repo_id(name)
  untagged = ('; Hub names carry a tag, e.g. timm:resnet18.a1_in1k'
              if '.' not in name.rpartition('/')[2] else '')
  untagged += f'; nor is {name} an existing path' if '/' in name else ''
  return FileNotFoundError(
      f'timm weights {name!r} are not in the Hugging Face cache {cache} ({reason}{untagged}): '
      f'on a machine with network run `huggingface-cli download {repo} config.json '
      f'model.safetensors` and copy {_repo_dir(repo, cache)} here (or set HF_HUB_CACHE), or '
      f'write a directory with timm.models._hub.save_for_hf(model, DIR, '
      'safe_serialization=True) (DIR/config.json + DIR/model.safetensors) and use timm:DIR')


def _cached_config(name: str) -> tuple[dict | None, str | None]:
  snapshot = _cached_snapshot(repo_id(name), hf_cache_dir())
  if snapshot is None:
    return None, None
  return _config_beside(os.path.join(snapshot, CONFIG_FILE))


# --- safetensors without torch -------------------------------------------------------------

_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64,
                       'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
                       'BOOL': np.bool_, 'BF16': 'bfloat16'}
_MAX_HEADER = 100 << 20


def _safetensors_header(path: str) -> tuple[dict, int]:
  """(header {key: {'dtype', 'shape', 'data_offsets'}}, data start); ValueError if no such file."""
  try:
    with open(path, 'rb') as f:
      (size,) = struct.unpack('<Q', f.read(8))
      if size > _MAX_HEADER:
        raise ValueError(f'header of {size} bytes')
      header = json.loads(f.read(size))
  except (OSError, ValueError, struct.error) as e:
    raise ValueError(f'{path} is not a safetensors file ({type(e).__name__}: {_first_line(e)}); '
                     f'{SPEC_FORMS}') from None
  header.pop('__metadata__', None)
  return header, 8 + size


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{key: shape} of a .safetensors file, from its header only."""
  return {k: tuple(v['shape']) for k, v in _safetensors_header(path)[0].items()}


def read_safetensors(path: str) -> dict[str, Array]:
  """{key: numpy array} of a .safetensors file (bfloat16 widened to float32), without torch."""
  header, start = _safetensors_header(path)
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=start) if header else None
  out = {}
  for key, info in header.items():
    dtype = _SAFETENSORS_DTYPES.get(info['dtype'])
    if dtype is None:
      raise ValueError(f'{path}: tensor {key!r} has dtype {info["dtype"]}, which is not read')
    begin, end = info['data_offsets']
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == 'bfloat16' else dtype)
    array = np.frombuffer(data[begin:end], dtype=dtype).reshape(info['shape'])
    out[key] = array.astype(np.float32) if dtype.name == 'bfloat16' else np.array(array)
  return out


def detect_format(keys) -> str:
  """'timm' if some key has timm's naming (`TIMM_KEYS`: cls_token, blocks.0..., conv_stem), else
  'torchvision' (timm's ResNet keys are torchvision's: either reading is the same)."""
  return 'timm' if any(TIMM_KEYS.match(k) for k in keys) else 'torchvision'


# --- preprocessing -------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's `_cfg` defaults, for fields a pretrained_cfg leaves out.
TIMM_DEFAULTS = {'mean': IMAGENET_MEAN, 'std': IMAGENET_STD, 'interpolation': 'bicubic',
                 'crop_pct': 0.875, 'input_size': (3, 224, 224)}


def preprocessing(model_name: str, spec) -> dict | None:
  """The preprocessing the weights of `spec` were trained with (module docstring), or None.

  Cheap: resolves the spec without downloading and reads a config.json at most (timm's
  registry, importing torch, only for timm:NAME:FILE whose NAME has no cached config). A timm
  NAME not in the cache gives None (`convert.load_weights` downloads it and its report's
  `preprocessing` then has the dict). Raises like `resolve` for missing paths and bad specs.
  """
  if isinstance(spec, Mapping):
    return None
  prefix, rest = split_spec(spec)
  try:
    source = resolve(spec, download=False)
  except FileNotFoundError:
    if prefix == 'timm' and is_hub_name(rest):
      return None  # a Hub NAME, not cached yet
    raise
  return source_preprocessing(model_name, source)


def source_preprocessing(model_name: str, source: Source) -> dict | None:
  """`preprocessing` of a resolved `Source` (None for torchvision weights)."""
  if source.config is not None:
    return _from_pretrained_cfg(_pretrained_cfg(source.config),
                                f"timm's pretrained_cfg in {source.config_path}")
  if source.format != 'timm':
    return None
  if source.name:
    return _from_registry(model_name, source.name)
  # A bare timm file: the architecture is the model's default one, and so is its preprocessing
  # (the default tag's pretrained_cfg, what timm.create_model(arch, pretrained=True) uses).
  arch = DEFAULT_ARCHITECTURE.get(model_name)
  return _from_registry(model_name, arch, bare_file=source.path) if arch else None


def _pretrained_cfg(config: Mapping) -> Mapping:
  cfg = config.get('pretrained_cfg')
  return cfg if isinstance(cfg, Mapping) else config  # old configs: the fields at the top


def _from_pretrained_cfg(cfg: Mapping, where: str) -> dict:
  """The preprocessing dict of a timm pretrained_cfg (`TIMM_DEFAULTS` for absent fields)."""
  defaulted = [k for k in TIMM_DEFAULTS if cfg.get(k) is None]
  value = lambda k: TIMM_DEFAULTS[k] if cfg.get(k) is None else cfg[k]
  note = f"; timm's defaults for {', '.join(defaulted)}" if defaulted else ''
  return {'mean': tuple(float(v) for v in value('mean')),
          'std': tuple(float(v) for v in value('std')),
          'interpolation': str(value('interpolation')),
          'crop_pct': float(value('crop_pct')),
          'input_size': tuple(int(v) for v in value('input_size')),
          'source': f'{where}{note}'}


def _from_registry(model_name: str, name: str, bare_file: str | None = None) -> dict | None:
  """timm's registered pretrained_cfg of `name` (imports timm and torch), None without timm.
  `bare_file`: the weights are that file, with no config.json; `name` is only its
  architecture, so its default tag's pretrained_cfg is taken (and the source says so)."""
  try:
    from timm.models import get_pretrained_cfg
  except ImportError:
    return None
  cfg = get_pretrained_cfg(name)
  if cfg is None:
    return None
  where = (f"timm's registry entry for {name} (weights for {model_name})" if bare_file is None
           else f"timm's registry default for {name} ({bare_file} has no config.json; set "
           'data.mean / data.std / data.interpolation if its weights were trained otherwise)')
  return _from_pretrained_cfg(dataclasses.asdict(cfg), where)


def describe_preprocessing(pre: dict | None) -> str:
  """A clause for a report: 'mean (0.5, 0.5, 0.5), std (...), bicubic, crop_pct 0.9, 224 px
  (from X)', or that none is known."""
  if pre is None:
    return 'none known from the weights (ImageNet defaults apply)'
  size = pre['input_size'][1:]
  px = f'{size[0]} px' if size[0] == size[1] else f'{size[0]}x{size[1]} px'
  return (f'mean {pre["mean"]}, std {pre["std"]}, {pre["interpolation"]}, crop_pct '
          f'{pre["crop_pct"]}, {px} (from {pre["source"]})')


# --- timm architectures --------------------------------------------------------------------

ARCHITECTURES = {  # timm architecture -> our model (same function and parameters)
    'resnet18': 'resnet18', 'resnet34': 'resnet34', 'resnet50': 'resnet50',
    'efficientnet_b0': 'efficientnet_b0',
    'vit_base_patch16_224': 'vit_b16', 'vit_base_patch16_384': 'vit_b16',
    'vit_base_patch32_224': 'vit_b32', 'vit_base_patch32_384': 'vit_b32',
    'vit_large_patch16_224': 'vit_l16', 'vit_large_patch16_384': 'vit_l16',
}
DEFAULT_ARCHITECTURE = {}  # our model -> the timm architecture a config-less file is taken for
for _arch, _model in ARCHITECTURES.items():
  DEFAULT_ARCHITECTURE.setdefault(_model, _arch)

# (regex on a timm architecture, how it differs from the torchvision model we rebuild).
REFUSED_ARCHITECTURES = (
    (r'^tf_efficientnet_', "TensorFlow 'same' padding (asymmetric at stride 2) and BatchNorm "
                           'eps 1e-3, where torchvision pads symmetrically with eps 1e-5'),
    (r'^(tf_)?efficientnetv2|^efficientnet_v2', 'EfficientNetV2 (fused-MBConv) blocks'),
    (r'^efficientnet_(b[1-8]|l2)', "another width, depth and resolution than B0's"),
    (r'^efficientnet_', "other blocks than B0's MBConv with squeeze-excitation"),
    (r'^resnet\d+[cdst]$', 'a deep stem of 3x3 convs (the d and t variants also average-pool '
                           'before the downsample convs)'),
    (r'^resnet.*_gn$', 'GroupNorm instead of BatchNorm'),
    (r'^resnetv2|^resnet\d+v2', 'pre-activation (ResNetV2) blocks'),
    (r'^(seresnet|ecaresnet|skresnet|gcresnet|resnext|wide_resnet|resnetrs|resnetaa|resnetblur)',
     'another block (attention, grouped, selective-kernel or anti-aliased convs)'),
    (r'^vit_.*_reg\d', 'register tokens'),
    (r'^vit_.*_gap_', "global average pooling and no class token (global_pool='avg')"),
    (r'^vit_.*(clip|quickgelu)', "a LayerNorm before the blocks (pre_norm) and CLIP's eps 1e-5"),
    (r'^vit_.*siglip', "an attention-pool head (global_pool='map') and no class token"),
    (r'^vit_.*_miil', 'no q/k/v bias (qkv_bias=False)'),
    (r'^vit_.*(rope|relpos)', 'other position embeddings'),
    (r'^vit_\w+_patch(8|14)_', 'another patch size'),
    (r'^vit_(tiny|small|medium|mediumd|betwixt|huge|giant|gigantic|so\d+m?|wee|pwee|little)_',
     'another width or depth'),
)


def _architecture(config: Mapping) -> str | None:
  arch = config.get('architecture') or _pretrained_cfg(config).get('architecture')
  return arch.split('.')[0] if isinstance(arch, str) else None


def timm_name(config: Mapping | None) -> str:
  """'vit_base_patch16_224.augreg_in21k' (architecture.tag) of a timm config."""
  arch = _architecture(config or {}) or '?'
  tag = _pretrained_cfg(config or {}).get('tag')
  return f'{arch}.{tag}' if tag else arch


def _refusal(arch: str) -> str:
  reason = next((d for r, d in REFUSED_ARCHITECTURES if re.search(r, arch)),
                'not among the timm architectures this project maps')
  return (f'timm architecture {arch!r} is refused: {reason}; loadable: '
          f'{", ".join(sorted(ARCHITECTURES))}')


# --- model_args / config values and keys that change the architecture ----------------------

def _one_of(*values):
  return lambda value, model: value in values


def _vit_size(field: str):
  return lambda value, model: value == getattr(vit.SIZES[models.spec(model).torchvision], field)


def _square(value, model) -> bool:
  return isinstance(value, int) or (isinstance(value, (list, tuple)) and len(set(value)) == 1)


def _has(pattern: str):
  regex = re.compile(pattern)
  return lambda shapes: any(regex.search(k) for k in shapes)


def _lacks(pattern: str):
  found = _has(pattern)
  return lambda shapes: not found(shapes)


def _no_class_row(shapes) -> bool:  # pos_embed [1, g*g, D]: timm's no_embed_class
  n = shapes.get('pos_embed', (1, 2, 1))[1]
  return math.isqrt(n) ** 2 == n and math.isqrt(n - 1) ** 2 != n - 1


def _layer_rows(prefix: str, names: Mapping[str, str], target: str, leaves: str):
  """Rows '{prefix}{timm module}.{leaf}' -> target.format(module=torchvision module, ...)."""
  return tuple((rf'^{prefix}{re.escape(t)}\.(?P<leaf>{leaves})$', target.replace('{module}', v))
               for t, v in names.items())


_W = 'weight|bias'
_BN = 'weight|bias|running_mean|running_var|num_batches_tracked'


@dataclasses.dataclass(frozen=True)
class Family:
  """How timm weights of one model family become torchvision's state_dict.

  rows: (regex on a timm key, torchvision key template formatted with the regex's named groups),
    first match wins; every timm key must match one.
  args: timm model_args / config key -> (accepted(value, our model) -> bool, the difference when
    not accepted; may use {value}).
  harmless: model_args that change no weight and nothing in eval mode (drop rates, img_size...).
  key_signs: (difference, test on {timm key: shape}) for architectures visible in the keys.
  marker: regex some timm key of this family matches (to tell families apart in bare files).
  """
  name: str
  rows: tuple[tuple[str, str], ...]
  args: Mapping[str, tuple[Callable[[Any, str], bool], str]]
  harmless: frozenset[str]
  key_signs: tuple[tuple[str, Callable[[Mapping], bool]], ...]
  marker: str

  @functools.cached_property
  def compiled(self) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple((re.compile(r), t) for r, t in self.rows)


_HARMLESS = frozenset({'in_chans', 'num_classes', 'drop_rate', 'drop_path_rate', 'device',
                       'dtype', 'pretrained_cfg', 'pretrained_cfg_overlay'})
_IN_CHANS = (_one_of(3), 'in_chans={value} (RGB models take 3 channels)')

# timm ResNet keys are torchvision's; the rows spell them out so that nothing else passes.
RESNET = Family(
    name='timm ResNet',
    rows=(_layer_rows('', {'conv1': 'conv1', 'fc': 'fc'}, '{module}.{leaf}', _W)
          + _layer_rows('', {'bn1': 'bn1'}, '{module}.{leaf}', _BN)
          + ((r'^(?P<m>layer[1-4]\.\d+\.(conv[1-3]|downsample\.0))\.(?P<leaf>weight)$',
              '{m}.{leaf}'),
             (rf'^(?P<m>layer[1-4]\.\d+\.(bn[1-3]|downsample\.1))\.(?P<leaf>{_BN})$',
              '{m}.{leaf}'))),
    args={'global_pool': (_one_of('avg'), "global_pool={value!r} (torchvision average-pools: "
                                          "'avg')"),
          'in_chans': _IN_CHANS,
          'stem_type': (_one_of(''), "stem_type={value!r} (a deep stem of 3x3 convs)"),
          'stem_width': (_one_of(64), 'stem_width={value}'),
          'avg_down': (_one_of(False), 'average-pool downsampling (avg_down)'),
          'cardinality': (_one_of(1), 'grouped convs (cardinality={value}, ResNeXt)'),
          'base_width': (_one_of(64), 'base_width={value} (another bottleneck width)'),
          'down_kernel_size': (_one_of(1), 'down_kernel_size={value}'),
          'block_reduce_first': (_one_of(1), 'block_reduce_first={value}'),
          'output_stride': (_one_of(32), 'output_stride={value} (dilated stages)'),
          'replace_stem_pool': (_one_of(False), 'a strided conv instead of the stem max-pool'),
          'channels': (_one_of([64, 128, 256, 512], (64, 128, 256, 512)), 'channels={value}'),
          'aa_layer': (_one_of(None), 'anti-aliased downsampling (aa_layer={value!r})'),
          'act_layer': (_one_of(None, 'relu'), 'act_layer={value!r}'),
          'norm_layer': (_one_of(None, 'batchnorm', 'batchnorm2d'), 'norm_layer={value!r}'),
          'block_args': (_one_of(None, {}), 'block_args={value!r} (attention in the blocks)')},
    harmless=_HARMLESS | {'drop_block_rate', 'zero_init_last'},
    key_signs=(('a deep stem of 3x3 convs (conv1.0, conv1.1, ...)', _has(r'^conv1\.\d+\.')),
               ('average-pool downsampling (avg_down: downsample.1 is a conv)',
                _has(r'\.downsample\.2\.')),
               ('attention in the blocks (se / attn modules)', _has(r'\.(se|attn)\.'))),
    marker=r'^layer1\.0\.conv1\.weight$',
)

# timm stage S (blocks.S) is torchvision's features.{S+1}; stage 0 is a DepthwiseSeparableConv
# (no expansion: torchvision block.0 = depthwise, block.1 = SE, block.2 = project), the others
# InvertedResidual (block.0 = expand, block.1 = depthwise, block.2 = SE, block.3 = project).
_DS_BLOCK = {'conv_dw': 'block.0.0', 'bn1': 'block.0.1', 'se.conv_reduce': 'block.1.fc1',
             'se.conv_expand': 'block.1.fc2', 'conv_pw': 'block.2.0', 'bn2': 'block.2.1'}
_IR_BLOCK = {'conv_pw': 'block.0.0', 'bn1': 'block.0.1', 'conv_dw': 'block.1.0',
             'bn2': 'block.1.1', 'se.conv_reduce': 'block.2.fc1', 'se.conv_expand': 'block.2.fc2',
             'conv_pwl': 'block.3.0', 'bn3': 'block.3.1'}
_HEAD_INDEX = len(efficientnet.STAGES) + 1  # features.8


def _efficientnet_rows() -> tuple[tuple[str, str], ...]:
  rows = (_layer_rows('', {'conv_stem': 'features.0.0', 'conv_head': f'features.{_HEAD_INDEX}.0',
                           'classifier': 'classifier.1'}, '{module}.{leaf}', _W)
          + _layer_rows('', {'bn1': 'features.0.1', 'bn2': f'features.{_HEAD_INDEX}.1'},
                        '{module}.{leaf}', _BN))
  for stage in range(len(efficientnet.STAGES)):
    for timm_module, torch_module in (_DS_BLOCK if stage == 0 else _IR_BLOCK).items():
      leaves = _BN if timm_module.startswith('bn') else _W
      rows += _layer_rows(rf'blocks\.{stage}\.(?P<b>\d+)\.', {timm_module: torch_module},
                          f'features.{stage + 1}.{{b}}.{{module}}.{{leaf}}', leaves)
  return rows


EFFICIENTNET = Family(
    name='timm EfficientNet',
    rows=_efficientnet_rows(),
    args={'global_pool': (_one_of('avg'), "global_pool={value!r} (torchvision average-pools)"),
          'in_chans': _IN_CHANS,
          'pad_type': (_one_of(''), "pad_type={value!r} (TensorFlow 'same' padding)"),
          'channel_multiplier': (_one_of(1, 1.0), 'channel_multiplier={value}'),
          'depth_multiplier': (_one_of(1, 1.0), 'depth_multiplier={value}'),
          'fix_stem': (_one_of(False), 'fix_stem'), 'stem_size': (_one_of(32), 'stem_size={value}'),
          'num_features': (_one_of(1280), 'num_features={value}'),
          'output_stride': (_one_of(32), 'output_stride={value} (dilated stages)'),
          'bn_eps': (_one_of(None, 1e-5), 'BatchNorm eps {value} (torchvision: 1e-5)'),
          'act_layer': (_one_of(None, 'swish', 'silu'), 'act_layer={value!r}'),
          'norm_layer': (_one_of(None), 'norm_layer={value!r}'),
          'se_layer': (_one_of(None), 'se_layer={value!r}'),
          'aa_layer': (_one_of(None), 'anti-aliased downsampling (aa_layer={value!r})')},
    harmless=_HARMLESS | {'bn_momentum'},
    key_signs=(('no squeeze-excitation (se.conv_reduce)', _lacks(r'\.se\.conv_reduce\.')),
               ('an expanding first stage (blocks.0.*.conv_pwl)',
                _has(r'^blocks\.0\.\d+\.conv_pwl'))),
    marker=r'^conv_stem\.weight$',
)

_VB = r'blocks\.(?P<i>\d+)\.'
_TV_LAYER = 'encoder.layers.encoder_layer_{i}.'
VIT = Family(
    name='timm VisionTransformer',
    rows=((r'^cls_token$', 'class_token'), (r'^pos_embed$', 'encoder.pos_embedding'),
          (rf'^patch_embed\.proj\.(?P<leaf>{_W})$', 'conv_proj.{leaf}'),
          (rf'^{_VB}attn\.qkv\.weight$', _TV_LAYER + 'self_attention.in_proj_weight'),
          (rf'^{_VB}attn\.qkv\.bias$', _TV_LAYER + 'self_attention.in_proj_bias'))
    + _layer_rows(_VB, {'norm1': 'ln_1', 'attn.proj': 'self_attention.out_proj', 'norm2': 'ln_2',
                        'mlp.fc1': 'mlp.0', 'mlp.fc2': 'mlp.3'}, _TV_LAYER + '{module}.{leaf}', _W)
    + _layer_rows('', {'norm': 'encoder.ln', 'head': 'heads.head'}, '{module}.{leaf}', _W),
    args={'global_pool': (_one_of('token'), "global_pool={value!r} (torchvision classifies the "
                                            "class token: 'token')"),
          'in_chans': _IN_CHANS,
          'img_size': (_square, 'a non-square img_size={value}'),
          'patch_size': (_vit_size('patch_size'), 'patch_size={value}'),
          'embed_dim': (_vit_size('hidden_dim'), 'embed_dim={value}'),
          'num_heads': (_vit_size('num_heads'), 'num_heads={value}'),
          'mlp_ratio': (_one_of(4, 4.0), 'mlp_ratio={value}'),
          'class_token': (_one_of(True), 'no class token (class_token=False)'),
          'fc_norm': (_one_of(None, False), 'fc_norm (a LayerNorm on the pooled features '
                                            'instead of the final norm)'),
          'no_embed_class': (_one_of(False), 'no class-token row in pos_embed (no_embed_class)'),
          'reg_tokens': (_one_of(0), 'register tokens (reg_tokens={value})'),
          'qkv_bias': (_one_of(True), 'no q/k/v bias (qkv_bias=False)'),
          'qk_norm': (_one_of(False), 'qk-norm'),
          'proj_bias': (_one_of(True), 'no attention output bias (proj_bias=False)'),
          'scale_attn_norm': (_one_of(False), 'a norm inside attention (scale_attn_norm)'),
          'scale_mlp_norm': (_one_of(False), 'a norm inside the MLP (scale_mlp_norm)'),
          'init_values': (_one_of(None), 'layer scale (ls1/ls2, init_values={value})'),
          'pre_norm': (_one_of(False), 'a LayerNorm before the blocks (pre_norm)'),
          'final_norm': (_one_of(True), 'no final LayerNorm (final_norm=False)'),
          'pos_embed': (_one_of('learn'), "pos_embed={value!r}"),
          'pool_include_prefix': (_one_of(False), 'pool_include_prefix'),
          'representation_size': (_one_of(None, 0), 'a pre_logits representation layer'),
          'act_layer': (_one_of(None, 'gelu'), 'act_layer={value!r}'),
          **{k: (_one_of(None), f'{k}={{value!r}}') for k in (
              'norm_layer', 'embed_layer', 'embed_norm_layer', 'block_fn', 'mlp_layer',
              'attn_layer')}},
    harmless=_HARMLESS | {'img_size', 'depth', 'pos_drop_rate', 'patch_drop_rate',
                          'proj_drop_rate', 'attn_drop_rate', 'weight_init', 'fix_init',
                          'dynamic_img_size', 'dynamic_img_pad'},
    key_signs=(('fc_norm (a LayerNorm on the pooled tokens instead of the final norm)',
                _has(r'^fc_norm\.')),
               ('register tokens (reg_token)', _has(r'^reg_token$')),
               ('layer scale (ls1 / ls2)', _has(r'\.ls[12]\.')),
               ('a pre_logits representation layer', _has(r'(^|\.)pre_logits\.')),
               ('a LayerNorm before the blocks (norm_pre, pre_norm=True)', _has(r'^norm_pre\.')),
               ('an attention-pool head (attn_pool)', _has(r'^attn_pool\.')),
               ('qk-norm (attn.q_norm / attn.k_norm)', _has(r'\.attn\.[qk]_norm\.')),
               ('norms inside attention / MLP (scale_attn_norm / scale_mlp_norm)',
                _has(r'\.(attn|mlp)\.norm\.')),
               ('a distillation token (dist_token)', _has(r'^dist_token$')),
               ('no class token (cls_token)', _lacks(r'^cls_token$')),
               ('no class-token row in pos_embed (no_embed_class)', _no_class_row),
               ('no q/k/v bias (qkv_bias=False)', _lacks(r'\.attn\.qkv\.bias$')),
               ('no final LayerNorm (norm)', _lacks(r'^norm\.weight$'))),
    marker=r'^blocks\.0\.attn\.qkv\.weight$',
)

FAMILIES = {'resnet18': RESNET, 'resnet34': RESNET, 'resnet50': RESNET,
            'efficientnet_b0': EFFICIENTNET, 'vit_b16': VIT, 'vit_b32': VIT, 'vit_l16': VIT}


# --- timm -> torchvision -------------------------------------------------------------------

def timm_to_torchvision(model_name: str, arrays: Mapping[str, Array], source: Source, *,
                        torch_shape: Callable[[str], tuple | None] | None = None
                        ) -> tuple[dict[str, Array], dict[str, str]]:
  """timm state_dict `arrays` -> ({torchvision key: array}, {torchvision key: timm key}).

  Checks, each a one-line ValueError naming the difference: the architecture (config, else
  `DEFAULT_ARCHITECTURE[model_name]`) maps to `model_name`; its model_args / config values;
  the keys (`Family.key_signs`, and every key matched by a row). `torch_shape(torchvision key)`
  gives the model's torchvision shape, used to resize a ViT position embedding timm's way.
  """
  where = source.describe('timm')
  family = _family(model_name, where)
  arch = _check_architecture(model_name, source, where)
  _check_args(family, model_name, source.config or {}, arch, where)
  shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
  _check_keys(family, model_name, shapes, arch, where)
  out, origin = _translate(family, arrays, arch, where)
  if torch_shape is not None and 'encoder.pos_embedding' in out:
    target = torch_shape('encoder.pos_embedding')
    if target is not None and tuple(target) != out['encoder.pos_embedding'].shape:
      out['encoder.pos_embedding'] = resize_pos_embed_timm(out['encoder.pos_embedding'], target)
  return out, origin


def _family(model_name: str, where: str) -> Family:
  if model_name not in FAMILIES:
    raise ValueError(f'{where}: {model_name} has no timm mapping (flowers_jax/weights.py '
                     f'FAMILIES); timm weights load into {", ".join(sorted(FAMILIES))}')
  return FAMILIES[model_name]


def _check_architecture(model_name: str, source: Source, where: str) -> str:
  """The timm architecture of `source`; ValueError if refused or not `model_name`'s."""
  arch = (_architecture(source.config) if source.config else
          source.name.rpartition('/')[2].split('.')[0] if source.name else
          DEFAULT_ARCHITECTURE.get(model_name))
  if arch not in ARCHITECTURES:
    raise ValueError(f'{where}: {_refusal(arch)}')
  if ARCHITECTURES[arch] != model_name:
    raise ValueError(f'{where}: timm {arch} weights are for model {ARCHITECTURES[arch]}, but '
                     f'the model trained is {model_name} (timm {DEFAULT_ARCHITECTURE[model_name]}'
                     ' weights load into it)')
  return arch


def _check_args(family: Family, model_name: str, config: Mapping, arch: str, where: str) -> None:
  """ValueError naming every model_arg / config value that changes the architecture (or that
  this file does not know)."""
  args = dict(config.get('model_args') or {})
  if 'global_pool' in config:
    args.setdefault('global_pool', config['global_pool'])
  unknown = [f'{k}={v!r}' for k, v in args.items()
             if k not in family.args and k not in family.harmless]
  if unknown:
    raise ValueError(f'{where}: timm model_args {", ".join(unknown)} not known to keep {arch} '
                     f"torchvision's architecture (flowers_jax/weights.py {family.name} args); "
                     'refused')
  differences = [family.args[k][1].format(value=v) for k, v in args.items()
                 if k in family.args and not family.args[k][0](v, model_name)]
  if differences:
    raise ValueError(f'{where}: refused, timm {arch} with {" and ".join(differences)} is not '
                     f"torchvision's {models.spec(model_name).torchvision} (which {model_name} "
                     'rebuilds)')


def _check_keys(family: Family, model_name: str, shapes: Mapping, arch: str, where: str) -> None:
  """ValueError when the keys are another family's or show an architecture difference."""
  if not any(re.search(family.marker, k) for k in shapes):
    other = next((f for f in FAMILIES.values() if any(re.search(f.marker, k) for k in shapes)),
                 None)
    shown = [k for k in shapes if other and re.search(other.marker, k)] or list(shapes)
    raise ValueError(f'{where}: the keys ({_few(shown)}) look like '
                     f'{other.name if other else "no timm model this project maps"} weights, '
                     f'not timm {arch} ({model_name})')
  for difference, present in family.key_signs:
    if present(shapes):
      raise ValueError(f'{where}: refused, the keys show {difference}: not torchvision\'s '
                       f'{models.spec(model_name).torchvision} (which {model_name} rebuilds)')


def _translate(family: Family, arrays: Mapping[str, Array], arch: str, where: str):
  out, origin, unknown = {}, {}, []
  for key, value in arrays.items():
    torch_key = _translate_key(family, key)
    if torch_key is None:
      unknown.append(key)
      continue
    out[torch_key], origin[torch_key] = value, key
  if unknown:
    raise ValueError(f'{where}: {len(unknown)} timm keys that no row of the {family.name} table '
                     f'(flowers_jax/weights.py) maps, e.g. {_few(unknown)}: not timm {arch}\'s '
                     'architecture; refused')
  return out, origin


def _translate_key(family: Family, key: str) -> str | None:
  for regex, template in family.compiled:
    m = regex.match(key)
    if m:
      return template.format(**m.groupdict())
  return None


def _few(items: list[str], n: int = 3) -> str:
  return '[' + ', '.join(items[:n]) + (f', ... (+{len(items) - n})' if len(items) > n else '') + ']'


# --- position embeddings, timm's way -------------------------------------------------------

def _aa_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """PyTorch's antialiased bicubic filter (PIL's, a = -0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def aa_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix M, M @ v = torch 1-D `F.interpolate(mode='bicubic', antialias=True,
  align_corners=False)` of v (PyTorch's `_compute_indices_weights_aa`)."""
  scale = n_in / n_out
  support, inv = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
    w = _aa_cubic((np.arange(lo, hi) - center + 0.5) * inv)
    m[i, lo:hi] = w / w.sum()
  return m


def resize_pos_embed_timm(pos: Array, target_shape) -> Array:
  """[1, 1 + g*g, D] -> `target_shape` [1, 1 + G*G, D] as timm's `resample_abs_pos_embed`
  (class-token row kept, the g x g grid resized bicubically with antialias). Returns float32."""
  pos, target_shape = np.asarray(pos), tuple(target_shape)
  (_, n_in, d), (_, n_out, d_out) = pos.shape, target_shape
  g_in, g_out = math.isqrt(n_in - 1), math.isqrt(n_out - 1)
  if pos.shape[0] != 1 or d != d_out or g_in ** 2 != n_in - 1 or g_out ** 2 != n_out - 1:
    raise ValueError(f'cannot resize a position embedding of shape {pos.shape} to '
                     f'{target_shape}: both must be [1, 1 + g*g, D] with the same D')
  m = aa_bicubic_matrix(g_in, g_out)
  grid = pos[0, 1:].reshape(g_in, g_in, d).astype(np.float64)
  grid = np.einsum('ai,bj,ijd->abd', m, m, grid).reshape(1, g_out * g_out, d)
  return np.concatenate([pos[:, :1], grid], axis=1).astype(np.float32)
