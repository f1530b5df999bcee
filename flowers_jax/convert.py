"""torchvision state_dict <-> Flax variables, one declarative table used both ways.

    variables, report = torchvision_to_flax('resnet18', 'resnet18.pth', num_classes=102)
    print(report.summary())
    state_dict = flax_to_torchvision('resnet18', variables)   # numpy, torch key names

How a Flax leaf finds its torch key
-----------------------------------
Flax submodules are named after torchvision's module paths, so a leaf path
'collection/m1/m2/.../leaf' maps to the torch key 'm1.m2....<torch leaf>' through the
generic table `LEAF_RULES` (keyed by collection, Flax leaf name and ndim):

    params/kernel 4-D   <-> weight        OIHW <-> HWIO, transpose(2, 3, 1, 0)
                                          (depthwise: (C,1,k,k) <-> (k,k,1,C), same rule)
    params/kernel 3-D   <-> weight        conv1d (O,I,K) <-> (K,I,O), transpose(2, 1, 0)
    params/kernel 2-D   <-> weight        Linear, .T
    params/bias         <-> bias
    params/scale        <-> weight        BatchNorm, LayerNorm
    batch_stats/mean    <-> running_mean
    batch_stats/var     <-> running_var
    (torch *.num_batches_tracked is dropped)

e.g. ('params', 'layer1', '0', 'conv1', 'kernel') <-> 'layer1.0.conv1.weight'.

Special rows: how a model adds leaves the generic table does not cover
----------------------------------------------------------------------
(ViT: class_token, encoder.pos_embedding, the q/k/v split of in_proj_*, out_proj,
older `mlp.linear_1` keys.) In the model file, pass `torch_rules` and `torch_aliases`
to the registration decorator; nothing in this file changes::

    from flowers_jax.models import registry

    def _split_qkv_kernel(w, *, target_shapes):  # torch [3D, D] -> 3 x [D, H, D/H]
      return tuple(m.T.reshape(s) for m, s in zip(np.split(w, 3), target_shapes))

    def _merge_qkv_kernel(q, k, v):              # inverse
      return np.concatenate([m.reshape(m.shape[0], -1).T for m in (q, k, v)])

    _L = 'encoder/layers/{layer}/self_attention'
    TORCHVISION_RULES = (
        registry.TorchRule('class_token', 'params/class_token'),         # identity
        registry.TorchRule('encoder.pos_embedding', 'params/encoder/pos_embedding'),
        registry.TorchRule('encoder.layers.{layer}.self_attention.in_proj_weight',
                           tuple(f'params/{_L}/{n}/kernel' for n in ('query', 'key', 'value')),
                           to_flax=_split_qkv_kernel, to_torch=_merge_qkv_kernel),
        ...)
    TORCHVISION_ALIASES = ((r'\\.mlp\\.linear_1\\.', '.mlp.0.'),
                           (r'\\.mlp\\.linear_2\\.', '.mlp.3.'))

    @registry.register('vit_b16', head=r'^heads/', torchvision='vit_b_16',
                       torch_rules=TORCHVISION_RULES, torch_aliases=TORCHVISION_ALIASES)
    def vit_b16(num_classes=1000, *, bn_axis_name=None, dtype=jnp.float32, ...): ...

A `TorchRule(torch, flax, to_flax=identity, to_torch=identity)` maps one torch key to
one or more Flax paths (with the collection prefix). `{field}` placeholders match one
path segment ('encoder_layer_3') and must appear on both sides. `to_flax(array)` returns
one array per Flax path, `to_torch(*arrays)` the torch array; both get numpy arrays.
A `to_flax` with a keyword parameter `target_shapes` also receives the shapes of its
Flax leaves (in `flax` order), e.g. to resize a position embedding to the model's.
Special rules are tried before the generic table. Aliases ((regex, replacement) pairs)
rename incoming torch keys only.

What loading checks
-------------------
The target tree is `jax.eval_shape(model.init, ...)`; every converted leaf is
shape-checked. A mismatch raises, naming the torch key and both shapes, except for the
classifier head (`models.HEAD_PATTERNS`): a head of another size is reported 'dropped'
and freshly initialised. Torch keys the model lacks (SE weights in an ECA model) are
'dropped'; Flax leaves no torch key fills (ECA, deformable layers, a new head) are
'initialised' by the model's own initialisers with a fixed seed (`rng`).

Every backbone tensor must load: a ValueError (one line: how many are missing, a few
keys) is raised when a leaf torchvision's model has, other than the head, finds no torch
key, unless `allow_partial=True` (then those leaves are initialised and listed in the
report). Backbone = the keys of the model built without options, i.e. torchvision's
architecture; the layers an option adds (ECA, deformable convs) are initialised. Before
matching, a state_dict is taken out of the dicts training scripts wrap it in
(`WRAPPER_KEYS`: {'model': sd}, {'state_dict': sd}, nested) and DataParallel's
'module.' prefixes are removed. A path that does not exist raises FileNotFoundError, a
file torch cannot read or a directory that is no converted checkpoint a ValueError.

Other formats: `load_weights`
----------------------------
`load_weights(name, spec, num_classes, ...)` takes a weights spec (`flowers_jax/weights.py`:
'torchvision:PATH', 'timm:DIR' / 'timm:FILE' / 'timm:NAME', or a bare path recognised by its
contents) and gives the same (variables, Report) with the same checks; timm weights are
translated to torchvision keys by the per-family tables in weights.py (architectures this
project does not rebuild exactly are refused) and `report.preprocessing` carries timm's
pretrained_cfg (mean, std, interpolation, crop_pct, input_size) or None.

Checkpoint directories
----------------------
`scripts/convert_torchvision.py` writes converted variables as an orbax checkpoint
(`save_variables`), read back by `load_variables`; `torchvision_to_flax` accepts such a
directory (or a .pth file) in place of a state_dict, so training needs no torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flowers_jax import models
from flowers_jax import weights as weights_lib

Array = np.ndarray


def _hwio_to_oihw(x):
  return np.transpose(x, (3, 2, 0, 1))


def _oihw_to_hwio(x):
  return np.transpose(x, (2, 3, 1, 0))


def _flip3(x):  # conv1d (O, I, K) <-> (K, I, O); its own inverse
  return np.transpose(x, (2, 1, 0))


def _same(x):
  return x


@dataclasses.dataclass(frozen=True)
class LeafRule:
  torch_leaf: str
  to_torch: Callable[[Array], Array]
  to_flax: Callable[[Array], Array]


# (collection, Flax leaf name, ndim or None for any) -> rule.
LEAF_RULES: dict[tuple[str, str, int | None], LeafRule] = {
    ('params', 'kernel', 4): LeafRule('weight', _hwio_to_oihw, _oihw_to_hwio),
    ('params', 'kernel', 3): LeafRule('weight', _flip3, _flip3),
    ('params', 'kernel', 2): LeafRule('weight', np.transpose, np.transpose),
    ('params', 'bias', None): LeafRule('bias', _same, _same),
    ('params', 'scale', None): LeafRule('weight', _same, _same),
    ('batch_stats', 'mean', None): LeafRule('running_mean', _same, _same),
    ('batch_stats', 'var', None): LeafRule('running_var', _same, _same),
}
IGNORED_TORCH_LEAVES = ('num_batches_tracked',)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of a model's resolved table: a torch key and the Flax leaves it fills."""
  torch_key: str
  flax_paths: tuple[str, ...]
  to_flax: Callable[..., Any]
  to_torch: Callable[..., Any]

  def flax_arrays(self, value: Array, target_shapes) -> tuple[Array, ...]:
    """`to_flax(value)` as a tuple; `target_shapes` passed on if it takes them."""
    if _takes_keyword(self.to_flax, 'target_shapes'):
      out = self.to_flax(value, target_shapes=tuple(target_shapes))
    else:
      out = self.to_flax(value)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _takes_keyword(fn, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):  # builtins without a signature
    return False


@dataclasses.dataclass
class Report:
  """What `torchvision_to_flax` / `load_weights` did: torch keys loaded / dropped (the keys of the
  file read: timm's names for timm weights), Flax paths initialised; `load_weights` also sets
  `source` (what it read, in which format) and `preprocessing` (`weights.preprocessing`'s dict
  or None)."""
  model: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  initialised: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)
  source: str = ''
  preprocessing: dict | None = None

  def summary(self) -> str:
    read = (f' Read {self.source}; preprocessing: '
            f'{weights_lib.describe_preprocessing(self.preprocessing)}.' if self.source else '')
    return (f'{self.model}: loaded {len(self.loaded)} torchvision tensors; '
            f'freshly initialised {len(self.initialised)} Flax leaves '
            f'{_short(self.initialised)}; dropped {len(self.dropped)} torch keys '
            f'{_short(self.dropped)} (num_batches_tracked is always ignored).{read}')


def _short(items: list[str], n: int = 6) -> str:
  shown = ', '.join(items[:n]) + (f', ... (+{len(items) - n})' if len(items) > n else '')
  return f'[{shown}]'


# --- building the table --------------------------------------------------------------

def _template_regex(template: str, sep: str) -> re.Pattern:
  """'a.{layer}.b' -> regex matching one path with `{field}` = one segment."""
  parts = re.split(r'\{(\w+)\}', template)
  pattern = ''.join(re.escape(p) if i % 2 == 0 else f'(?P<{p}>[^{re.escape(sep)}]+)'
                    for i, p in enumerate(parts))
  return re.compile(pattern + '$')


def _match_rule(rule: models.TorchRule, path: str) -> Entry | None:
  for template in rule.flax_paths:
    m = _template_regex(template, '/').match(path)
    if m:
      fields = m.groupdict()
      try:
        torch_key = rule.torch.format(**fields)
      except KeyError as e:
        raise ValueError(f'TorchRule {rule.torch!r} lacks placeholder {e} used in '
                         f'{template!r}') from None
      return Entry(torch_key, tuple(t.format(**fields) for t in rule.flax_paths),
                   rule.to_flax, rule.to_torch)
  return None


def _generic_entry(path: str, ndim: int) -> Entry | None:
  collection, *modules, leaf = path.split('/')
  rule = LEAF_RULES.get((collection, leaf, ndim)) or LEAF_RULES.get((collection, leaf, None))
  if rule is None or not modules:
    return None
  return Entry('.'.join(modules + [rule.torch_leaf]), (path,), rule.to_flax, rule.to_torch)


def table(name: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Entry], list[str]]:
  """The resolved mapping for Flax leaves `shapes` ({'params/fc/kernel': shape}).

  Returns ({torch_key: Entry}, [Flax paths that have no torch key]).
  """
  rules = models.spec(name).torch_rules
  entries, unmapped = {}, []
  for path, shape in shapes.items():
    entry = next(filter(None, (_match_rule(r, path) for r in rules)), None)
    entry = entry or _generic_entry(path, len(shape))
    if entry is None:
      unmapped.append(path)
      continue
    missing = [p for p in entry.flax_paths if p not in shapes]
    if missing:
      raise ValueError(f'rule for torch key {entry.torch_key!r} names Flax leaves the '
                       f'{name} model lacks: {missing}')
    entries[entry.torch_key] = entry
  return entries, unmapped


# --- helpers -------------------------------------------------------------------------

def _flatten(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _unflatten(flat: Mapping[str, Any]):
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')


def _to_numpy(value) -> Array:
  """numpy view of a torch tensor (any device, bf16 widened) or array-like."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _example_input(model) -> jax.ShapeDtypeStruct:
  """[1, S, S, 3]; models whose param shapes depend on S expose `image_size`."""
  size = getattr(model, 'image_size', None) or 224
  return jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)


def _abstract_variables(model) -> dict[str, jax.ShapeDtypeStruct]:
  keys = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(0)}
  return _flatten(jax.eval_shape(lambda x: model.init(keys, x, train=False),
                                 _example_input(model)))


def _init_missing(model, loaded: Mapping[str, Any], rng) -> dict[str, Any]:
  """`loaded` completed by the model's own initialisers (fixed seed `rng`).

  Runs `model.apply` with every collection mutable: Flax initialises exactly the
  variables that are absent, and only their initialisers are compiled (a full
  `model.init` compiles one random draw per leaf, ~10x slower on CPU).
  """
  params_rng, dropout_rng = jax.random.split(rng)
  x = jnp.zeros(_example_input(model).shape, jnp.float32)

  @jax.jit
  def complete(variables):
    _, state = model.apply(variables, x, train=False, mutable=True,
                           rngs={'params': params_rng, 'dropout': dropout_rng})
    return state
  return _flatten(complete(_unflatten(loaded)))


def _is_head(name: str, path: str) -> bool:
  collection, _, rest = path.partition('/')
  return collection == 'params' and re.search(models.HEAD_PATTERNS[name], rest) is not None


def _head_classes(name: str, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
  """num_classes from the 1-D head leaf (the bias) of a Flax shape table."""
  biases = [s for p, s in shapes.items() if _is_head(name, p) and len(s) == 1]
  return biases[-1][0] if biases else None


def head_classes(name: str, variables) -> int | None:
  """num_classes of Flax `variables` of model `name` (the size of its head bias)."""
  return _head_classes(name, {p: np.shape(v) for p, v in _flatten(variables).items()})


def _state_dict_classes(name: str, state_dict: Mapping[str, Array],
                        model_options) -> int | None:
  """num_classes of a torch state_dict, from the torch key of the head bias."""
  probe = models.create(name, num_classes=1000, **model_options)
  shapes = {p: v.shape for p, v in _abstract_variables(probe).items()}
  entries, _ = table(name, shapes)
  for key, entry in entries.items():
    if any(_is_head(name, p) and len(shapes[p]) == 1 for p in entry.flax_paths):
      if key in state_dict:
        return int(np.shape(state_dict[key])[0])
  return None


EXPECTED_WEIGHTS = ('expected a torchvision state_dict saved with torch.save (.pth) or a '
                    'directory written by scripts/convert_torchvision.py')
# Training scripts save the state_dict inside a dict: {'model': sd} (torchvision's
# references), {'state_dict': sd} (Lightning), {'model_state_dict': sd} (torch tutorials),
# nested at most _MAX_WRAPPERS deep.
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict')
_MAX_WRAPPERS = 3
# Key prefixes of wrapped modules: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIX = re.compile(r'^(?:module\.|_orig_mod\.)+')


def _unwrap(source: Mapping) -> Mapping:
  """The state_dict inside checkpoint wrappers ({'model': {'state_dict': sd}} -> sd)."""
  for _ in range(_MAX_WRAPPERS):
    inner = [source[k] for k in WRAPPER_KEYS if isinstance(source.get(k), Mapping)]
    if not inner:
      break
    source = inner[0]
  return source


def _state_dict_arrays(source: Mapping) -> dict[str, Array]:
  """{torch key: numpy array}, wrappers and 'module.' prefixes removed."""
  return {WRAPPER_PREFIX.sub('', str(k)): _to_numpy(v) for k, v in _unwrap(source).items()}


def _torch_load(path: str):
  """torch.load of a weights file; ValueError (one line) for anything torch cannot read."""
  try:
    import torch  # the torch extra, only for .pth
  except ImportError:
    raise ImportError(f'reading {path} needs torch (pip install flowers_jax[torch]); or '
                      'convert it with scripts/convert_torchvision.py') from None
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # Unpickling, Runtime, EOF...
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    raise ValueError(f'{path} is not a torch weights file ({type(e).__name__}: {reason}); '
                     f'{EXPECTED_WEIGHTS}') from None


def _read_directory(name: str, path: str) -> dict[str, Array]:
  """The state_dict of a `save_variables` directory (ValueError for any other one)."""
  try:
    metadata = load_metadata(path) if os.path.exists(
        os.path.join(path, '_CHECKPOINT_METADATA')) else {}
  except Exception:  # orbax: a damaged or foreign layout
    metadata = {}
  if 'model' not in metadata:
    raise ValueError(f'{path} is a directory but not a converted checkpoint; '
                     f'{EXPECTED_WEIGHTS}')
  if metadata['model'] != name:
    raise ValueError(f'{path} holds {metadata["model"]!r} variables, not {name!r}')
  return flax_to_torchvision(name, load_variables(path), **metadata.get('options', {}))


def _read_state_dict(name: str, source) -> dict[str, Array]:
  """A state_dict from a mapping, a torch .pth file or a `save_variables` directory.

  Wrappers ({'model': sd}, {'state_dict': sd}, see `WRAPPER_KEYS`) and 'module.'
  prefixes are removed. A missing path raises FileNotFoundError, anything else that
  is no weights file a ValueError, each with one line.
  """
  if isinstance(source, Mapping):
    return _state_dict_arrays(source)
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f'weights path {path} does not exist; {EXPECTED_WEIGHTS}')
  if os.path.isdir(path):
    return _read_directory(name, path)
  loaded = _torch_load(path)
  if not isinstance(loaded, Mapping):
    raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state_dict; '
                     f'{EXPECTED_WEIGHTS}')
  return _state_dict_arrays(loaded)


def _torchvision_keys(name: str, entries: Mapping[str, Entry], num_classes: int,
                      model_options) -> list[str]:
  """The torch keys of `entries` that torchvision's model has, its head excluded.

  The model's options add layers torchvision lacks (ECA, deformable convs): the keys
  of the model without options (= torchvision's architecture) tell them apart.
  """
  keys = list(entries)
  if model_options:
    plain = models.create(name, num_classes=num_classes)
    plain_keys = table(name, {p: v.shape for p, v in _abstract_variables(plain).items()})[0]
    keys = [k for k in keys if k in plain_keys]
  keys = [k for k in keys if not any(_is_head(name, p) for p in entries[k].flax_paths)]
  return sorted(keys, key=lambda k: not entries[k].flax_paths[0].startswith('params/'))


VALID_TORCHVISION = (f'a torchvision state_dict, possibly inside {"/".join(WRAPPER_KEYS)} '
                     'dicts or with "module." prefixes')


def _check_complete(name: str, required: list[str], report: Report,
                    valid: str = VALID_TORCHVISION) -> None:
  """ValueError (one line) when a backbone tensor of `required` was not loaded."""
  loaded = set(report.loaded)
  missing = [k for k in required if k not in loaded]
  if missing:
    raise ValueError(
        f'{name}: {len(missing)} of {len(required)} backbone tensors missing from the '
        f'weights, e.g. {_short(missing, 3)}; unused keys in the weights: '
        f'{len(report.dropped)} {_short(report.dropped, 3)}. Valid: {valid}; '
        'allow_partial=True (config init.allow_partial) loads what matches '
        'and initialises the rest')


def _rename(key: str, aliases) -> str:
  for pattern, replacement in aliases:
    key = re.sub(pattern, replacement, key)
  return key


# --- the two directions ----------------------------------------------------------------

def torchvision_to_flax(name: str, state_dict, num_classes: int | None = None, *,
                        rng: jax.Array | None = None, allow_partial: bool = False,
                        **model_options):
  """Converts a torchvision state_dict into Flax variables for `models.create(name, ...)`.

  Args:
    name: registered model name ('resnet18').
    state_dict: {torch key: tensor or numpy array}, a path to a torch .pth file, or a
      directory written by `save_variables` / scripts/convert_torchvision.py. A
      state_dict inside {'model': ...} / {'state_dict': ...} dicts (`WRAPPER_KEYS`) or
      with DataParallel's 'module.' prefixes is unwrapped.
    num_classes: head size; None keeps the checkpoint's. Another size than the
      checkpoint's drops its head and initialises a new one.
    rng: PRNG key for freshly initialised leaves (default PRNGKey(0)).
    allow_partial: load whatever matches and initialise the rest; by default a
      ValueError is raised unless every backbone tensor (every leaf torchvision's model
      has, except the head) is loaded.
    **model_options: options of the model (e.g. deform='after_conv1').

  Returns:
    (variables {'params': ..., 'batch_stats': ...} of numpy/jax arrays, Report).
  """
  return _to_flax(name, _read_state_dict(name, state_dict), num_classes, rng=rng,
                  allow_partial=allow_partial, model_options=model_options)


def _to_flax(name: str, source: Mapping[str, Array], num_classes: int | None, *, rng,
             allow_partial: bool, model_options: Mapping[str, Any],
             valid: str = VALID_TORCHVISION):
  """`torchvision_to_flax` of a {torch key: numpy array} state_dict; `valid` says, in the
  incomplete-weights error, what the weights should have been."""
  spec = models.spec(name)
  source = {_rename(k, spec.torch_aliases): v for k, v in source.items()
            if k.rsplit('.', 1)[-1] not in IGNORED_TORCH_LEAVES}
  if num_classes is None:
    num_classes = _state_dict_classes(name, source, model_options) or 1000
  model = models.create(name, num_classes=num_classes, **model_options)
  target = _abstract_variables(model)
  entries, _ = table(name, {p: v.shape for p, v in target.items()})

  out, report = {}, Report(name)
  for key, value in source.items():
    entry = entries.get(key)
    if entry is None:
      report.dropped.append(key)
      continue
    try:
      arrays = entry.flax_arrays(value, (target[p].shape for p in entry.flax_paths))
    except ValueError:  # a rule's reshape to the model's shapes failed: the sizes differ
      arrays = ()
    bad = [(p, a.shape) for p, a in zip(entry.flax_paths, arrays)
           if a.shape != target[p].shape]
    if bad and all(_is_head(name, p) for p, _ in bad):
      report.dropped.append(key)
      continue
    if bad or len(arrays) != len(entry.flax_paths):
      expected = entry.to_torch(*(np.zeros(target[p].shape, np.float32)
                                  for p in entry.flax_paths)).shape
      raise ValueError(f'{name}: torch key {key!r} has shape {tuple(np.shape(value))} but '
                       f'the model expects {tuple(expected)} (Flax '
                       f'{[(p, target[p].shape) for p in entry.flax_paths]})')
    for path, array in zip(entry.flax_paths, arrays):
      out[path] = np.asarray(array, dtype=target[path].dtype)
    report.loaded.append(key)

  if not allow_partial:
    _check_complete(name, _torchvision_keys(name, entries, num_classes, model_options), report,
                    valid)
  report.initialised = [p for p in target if p not in out]
  if report.initialised:
    fresh = _init_missing(model, out, jax.random.PRNGKey(0) if rng is None else rng)
    out.update({p: np.asarray(fresh[p]) for p in report.initialised})
  if spec.post_load is not None:  # e.g. ResNet's deform_init='pretrained' conv1 split
    wanted = inspect.signature(spec.post_load).parameters  # its options (not e.g. remat)
    out = spec.post_load(out, tuple(report.initialised),
                         **{k: v for k, v in model_options.items() if k in wanted})
  return _unflatten(out), report


# --- any weights format (flowers_jax/weights.py) ------------------------------------------

def load_weights(model_name: str, spec, num_classes: int | None = None, *,
                 rng: jax.Array | None = None, allow_partial: bool = False, **model_options):
  """Flax variables for `models.create(model_name, ...)` from weights in any supported format.

  Args:
    model_name: the model trained ('vit_b16').
    spec: a weights spec (`flowers_jax/weights.py`: 'torchvision:PATH', 'timm:DIR',
      'timm:FILE', 'timm:NAME', 'timm:NAME:FILE' or a bare PATH recognised by its contents), or
      a {key: array} state_dict (torchvision or timm keys, told apart by
      `weights.detect_format`).
    num_classes, rng, allow_partial, **model_options: as `torchvision_to_flax`: the same head
      replacement ('dropped' + initialised), fresh leaves and refusal of partial loads.

  Returns:
    (variables, Report). timm weights are translated to torchvision keys first
    (`weights.timm_to_torchvision`, which refuses architectures this project does not rebuild,
    one-line ValueErrors); their report lists timm's own key names. `report.source` says what
    was read in which format, `report.preprocessing` is timm's pretrained_cfg as
    `weights.preprocessing` gives it, or None (torchvision weights, config-less files).
  """
  source, arrays = _read_weights(model_name, spec)
  fmt = weights_lib.detect_format(arrays) if source.format == 'auto' else source.format
  origin, valid = {}, VALID_TORCHVISION
  if fmt == 'timm':
    arrays, origin = weights_lib.timm_to_torchvision(
        model_name, arrays, source, torch_shape=_torch_shape_of(model_name, model_options))
    valid = (f"{source.describe('timm')}, its keys translated to torchvision's by "
             'flowers_jax/weights.py')
  variables, report = _to_flax(model_name, arrays, num_classes, rng=rng,
                               allow_partial=allow_partial, model_options=model_options,
                               valid=valid)
  report.loaded = [origin.get(k, k) for k in report.loaded]
  report.dropped = [origin.get(k, k) for k in report.dropped]
  report.source = source.describe(fmt)
  report.preprocessing = (weights_lib.source_preprocessing(model_name, source)
                          if fmt == 'timm' else None)
  return variables, report


def _read_weights(name: str, spec) -> tuple[weights_lib.Source, dict[str, Array]]:
  """(Source, {key: numpy array}) of a spec: safetensors without torch, the rest as
  `_read_state_dict` reads it (torch files, converted directories)."""
  if isinstance(spec, Mapping):
    return weights_lib.Source('auto', 'given as a state_dict'), _state_dict_arrays(spec)
  source = weights_lib.resolve(spec)
  if source.path.endswith('.safetensors'):
    return source, _state_dict_arrays(weights_lib.read_safetensors(source.path))
  return source, _read_state_dict(name, source.path)


def _torch_shape_of(name: str, model_options: Mapping[str, Any]) -> Callable[[str], tuple | None]:
  """torch_shape(torch key) -> its shape in torchvision's layout for `models.create(name,
  **model_options)`, None for keys the model lacks (e.g. the target position embedding)."""
  def torch_shape(key: str) -> tuple | None:
    target = _abstract_variables(models.create(name, **model_options))
    entry = table(name, {p: v.shape for p, v in target.items()})[0].get(key)
    if entry is None:
      return None
    zeros = (np.zeros(target[p].shape, np.float32) for p in entry.flax_paths)
    return tuple(np.shape(entry.to_torch(*zeros)))
  return torch_shape


def flax_to_torchvision(name: str, variables, **model_options) -> dict[str, Array]:
  """Flax variables -> {torch key: numpy array}, loadable with `load_state_dict`.

  The variables are shape-checked against `models.create(name, num_classes=<their
  head size>, **model_options)`. Leaves torchvision's model lacks (ECA, deformable
  layers) come out under their generic names, so a `save_variables` directory keeps
  them; `load_state_dict(..., strict=False)` ignores them. Leaves no rule covers are
  left out.
  """
  flat = {p: np.asarray(v) for p, v in _flatten(variables).items()}
  shapes = {p: v.shape for p, v in flat.items()}
  model = models.create(name, num_classes=_head_classes(name, shapes) or 1000,
                        **model_options)
  expected = {p: v.shape for p, v in _abstract_variables(model).items()}
  if expected != shapes:
    diff = sorted(p for p in set(expected) | set(shapes) if expected.get(p) != shapes.get(p))
    raise ValueError(f'variables do not fit {name} with options {model_options}; '
                     f'leaves differing (path, expected, given): '
                     f'{[(p, expected.get(p), shapes.get(p)) for p in diff[:10]]}')
  entries, _ = table(name, shapes)
  return {key: np.asarray(e.to_torch(*(flat[p] for p in e.flax_paths)))
          for key, e in entries.items()}


# --- orbax checkpoint directories ---------------------------------------------------

def save_variables(path, variables, *, model: str, num_classes: int,
                   options: Mapping[str, Any] | None = None, report: Report | None = None,
                   force: bool = False) -> None:
  """Writes `variables` as an orbax checkpoint at `path` (a new directory)."""
  metadata = {'model': model, 'num_classes': num_classes, 'options': dict(options or {})}
  if report is not None:
    metadata['report'] = dataclasses.asdict(report)
  tree = jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(variables))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), tree, custom_metadata=metadata, force=force)


def load_variables(path) -> dict[str, Any]:
  """The variables of a `save_variables` directory, as numpy arrays."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path))


def load_metadata(path) -> dict[str, Any]:
  """{'model', 'num_classes', 'options', 'report'} stored by `save_variables`."""
  with ocp.StandardCheckpointer() as checkpointer:
    return dict(checkpointer.metadata(os.path.abspath(path)).custom_metadata or {})
