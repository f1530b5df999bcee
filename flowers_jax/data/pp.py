"""Preprocessing ops: a registry, and the '|'-joined op strings of ``config.data.pp_*``.

  pipe = pp.parse('resize_small(256)|center_crop(224)', cfg)   # cfg: data.DataConfig
  image = pipe(image)                   # uint8 [H, W, 3] -> uint8 [S, S, 3]
  image = pp.parse('rrc_flip', cfg)(image, seed)                # random ops need a seed

A spec is a preset name (``PRESETS``; a spec equal to one is that preset, so
``'center_crop'`` is the eval view) or ops joined by ``'|'``, each ``name`` or
``name(args)`` with Python literals as arguments, positional or by keyword. An
argument left out comes from the data config when the op names a key for it
(``image_size``, ``eval_resize``, ``interpolation``), else from the op's own
default; so ``center_crop`` is ``center_crop(config.data.image_size)``. Unknown ops,
presets or arguments are a one-line ``ValueError`` from ``parse``, before any data
is read (and before TensorFlow is imported); so is a spec whose output is not
``[image_size, image_size, 3]``, known from each op's declared output size.

Decoding and normalisation are not ops: the ``pipeline.ImageStore`` decodes (once,
possibly cached), and ``pipeline`` normalises the pp output with ImageNet mean/std,
so every op works on uint8 ``[H, W, 3]`` images.

Randomness: an op is random when it takes a keyword-only ``seed``. With the
example's stateless seed ``s`` (``pipeline.example_seed``: a function of seed, epoch,
position and triplet part), the k-th of a pipeline's n random ops gets
``stateless_split(s, n)[k]``, a lone random op gets ``s`` itself. ``pp_eval`` may not
hold random ops.

A new op is one function of ``(image, args..., *, seed)`` under ``@register(...)``,
whose keywords map arguments to the ``config.data`` keys that fill them; ``out=``
says what size it returns: ``'same'`` as its input (the default), ``'size'`` its
``size`` argument squared, ``'any'`` unknown until a later op fixes it.

The device path (``device_pp``: the ops on images held on the accelerator) splits a random
op's parameter draw from its pixel work: ``register(draw=...)`` gives the op's draw alone,
``(shape, args..., *, seed) -> {name: tensor}`` for an input of ``shape`` [H, W, ...], the same
function of the seed as the op's own (``Pipeline.draw`` runs them all, no pixels); an
``out='any'`` op gives its output (h, w) with ``shape=``. Which ops have a device version is
``device_pp.OPS``'s table; ``device_pp.unsupported(pipe)`` names the others.
"""

import ast
import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Literal

from flowers_jax.data import randaugment as rand_augment
from flowers_jax.data import transforms

Interpolation = Literal[transforms.INTERPOLATIONS]

_EVAL_VIEW = 'resize_small|center_crop'
PRESETS = {
    'rrc_flip': 'random_resized_crop|flip_lr',  # torchvision RandomResizedCrop + flip
    'flip': f'{_EVAL_VIEW}|flip_lr',  # the eval view + flip
    'none': _EVAL_VIEW,
    'center_crop': _EVAL_VIEW,  # Resize(eval_resize) + CenterCrop(image_size)
}
# Whether each config key may hold random ops.
KEYS = {'pp_train': True, 'pp_eval': False}
# The key of the drawn parameters in ``Dataset.device_train_stream``'s batches (``Pipeline.draw``).
PARAMS_KEY = 'pp_params'


@dataclasses.dataclass(frozen=True)
class Op:
  """A registered op: ``fn(image, args..., [*, seed])``; ``from_config`` maps an
  argument to the ``config.data`` key that fills it when the spec leaves it out;
  ``out`` is its output size: 'same' (as the input), 'size' (its ``size`` argument) or
  'any'; ``checks``: argument -> (predicate on its value, what is valid), or a tuple of
  arguments -> (predicate on their values, what is valid); ``draw``: a random op's parameter
  draw alone, ``(shape, args..., *, seed) -> {name: tensor}`` (None: none, the op runs on the
  host only); ``shape``: an ``out='any'`` op's output ``(shape, args...) -> (h, w)``."""
  fn: Callable
  from_config: dict[str, str]
  out: str = 'same'
  checks: dict[str | tuple[str, ...], tuple[Callable[..., bool], str]] = dataclasses.field(
      default_factory=dict)
  draw: Callable | None = None
  shape: Callable | None = None

  @property
  def random(self) -> bool:
    return 'seed' in inspect.signature(self.fn).parameters

  def params(self) -> list[inspect.Parameter]:
    """The arguments a spec may give (all but the image and the seed)."""
    return [p for p in list(inspect.signature(self.fn).parameters.values())[1:]
            if p.name != 'seed']

  def usage(self) -> str:
    """``name(arg=default, ...)``, e.g. ``center_crop(size=data.image_size)``."""
    show = lambda p: (f'data.{self.from_config[p.name]}' if p.name in self.from_config
                      else repr(p.default))
    return f'{self.fn.__name__}({", ".join(f"{p.name}={show(p)}" for p in self.params())})'

  def out_shape(self, shape, kwargs: dict):
    """The output's (h, w) for an input of ``shape`` [H, W, ...] (ints or TF scalars)."""
    return _OUT_SHAPES[self.out](self, shape, kwargs)


_OUT_SHAPES = {
    'same': lambda op, shape, kwargs: (shape[0], shape[1]),
    'size': lambda op, shape, kwargs: (kwargs['size'], kwargs['size']),
    'any': lambda op, shape, kwargs: op.shape(shape, **kwargs),
}


OPS: dict[str, Op] = {}


OUT_SIZES = ('same', 'size', 'any')


def register(out: str = 'same', checks: dict | None = None, draw: Callable | None = None,
             shape: Callable | None = None, **from_config: str) -> Callable:
  """Decorator: registers ``fn`` under its name; ``out``: its output size (``OUT_SIZES``);
  ``checks``: argument (or tuple of arguments) -> (predicate, what is valid), applied when
  a spec is parsed; ``draw`` / ``shape``: see ``Op``; ``from_config``: argument -> data key."""
  if out not in OUT_SIZES:
    raise ValueError(f'register(out={out!r}); valid: {OUT_SIZES}')

  def add(fn):
    OPS[fn.__name__] = Op(fn, from_config, out, dict(checks or {}), draw, shape)
    return fn
  return add


def _number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _ordered_pair(lo: float, hi: float, *, lo_open: bool):
  """A (min, max) tuple of numbers with lo < / <= min <= max <= hi."""
  def ok(v):
    return (isinstance(v, tuple) and len(v) == 2 and all(map(_number, v))
            and (v[0] > lo if lo_open else v[0] >= lo) and v[0] <= v[1] <= hi)
  return ok


POSITIVE = (lambda v: v >= 1, 'an integer >= 1 (pixels)')
NOT_NEGATIVE = (lambda v: v >= 0, 'an integer >= 0 (pixels)')
SCALE = (_ordered_pair(0, 1, lo_open=True), 'a pair (min, max) with 0 < min <= max <= 1')
RATIO = (_ordered_pair(0, float('inf'), lo_open=True), 'a pair (min, max) with 0 < min <= max')
PROBABILITY = (lambda v: 0 <= v <= 1, 'a number in [0, 1]')
COUNT = (lambda v: v >= 0, 'an integer >= 0')


# ---------------------------------------------------------------- parameter draws (host)


def _rrc_window(shape, size, method, scale, ratio, *, seed) -> dict:
  """random_resized_crop's draw: 'window' int32 [4], (top, left, h, w) in its input's pixels."""
  del size, method
  tf = _import_tf()
  return {'window': tf.stack(transforms.random_resized_crop_window(shape, seed, scale, ratio))}


def _flip_coin(shape, *, seed) -> dict:
  """flip_lr's draw: 'flip' int32 scalar, 1 = flip."""
  del shape
  tf = _import_tf()
  return {'flip': tf.cast(transforms.flip_coin(seed), tf.int32)}


def _shorter_side(shape, size, method) -> tuple:
  del method
  return transforms.resize_shorter_size(shape, size)


# ---------------------------------------------------------------- ops: uint8 [H, W, 3] in


@register(out='any', checks={'size': POSITIVE}, shape=_shorter_side, size='eval_resize',
          method='interpolation')
def resize_small(image, size: int, method: Interpolation):
  """Shorter side -> ``size`` (torchvision ``Resize(size)``)."""
  return transforms.resize_shorter(image, size, method)


@register(out='size', checks={'size': POSITIVE}, size='image_size', method='interpolation')
def resize(image, size: int, method: Interpolation):
  """-> [size, size, 3], aspect ratio not kept."""
  return transforms.resize(image, size, size, method)


@register(out='size', checks={'size': POSITIVE}, size='image_size')
def center_crop(image, size: int):
  """-> [size, size, 3] from the centre (torchvision ``CenterCrop``: a smaller image is
  zero-padded first)."""
  return transforms.center_crop(image, size)


@register(out='size', checks={'size': POSITIVE, 'scale': SCALE, 'ratio': RATIO},
          draw=_rrc_window, size='image_size', method='interpolation')
def random_resized_crop(image, size: int, method: Interpolation,
                        scale: tuple = transforms.RRC_SCALE,
                        ratio: tuple = transforms.RRC_RATIO, *, seed):
  """torchvision ``RandomResizedCrop(size, scale, ratio)`` -> [size, size, 3]."""
  return transforms.random_resized_crop(image, size, seed, scale, ratio, method)


@register(out='size', checks={'size': POSITIVE, 'padding': NOT_NEGATIVE}, size='image_size')
def random_crop(image, size: int, padding: int = 0, *, seed):
  """torchvision ``RandomCrop(size, padding)``: zero-pad, crop at a random offset."""
  return transforms.random_crop(image, size, seed, padding)


@register(draw=_flip_coin)
def flip_lr(image, *, seed):
  """Horizontal flip with probability 1/2."""
  return transforms.random_flip(image, seed)


@register(checks={'num_ops': COUNT, 'magnitude': COUNT,
                  'num_magnitude_bins': (lambda v: v >= 2, 'an integer >= 2'),
                  ('magnitude', 'num_magnitude_bins'): (lambda m, n: m < n,
                                                        'magnitude < num_magnitude_bins')})
def randaugment(image, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, *,
                seed):
  """torchvision ``RandAugment(num_ops, magnitude, num_magnitude_bins)`` (torchvision
  ``transforms/autoaugment.py``): ``num_ops`` of its 14 ops, uniform with replacement, at bin
  ``magnitude`` of each op's range, signed ones negated with probability 1/2; nearest
  interpolation, fill 0 (``randaugment.py``)."""
  return rand_augment.randaugment(image, seed, num_ops, magnitude, num_magnitude_bins)


@register(checks={'p': PROBABILITY, 'scale': SCALE, 'ratio': RATIO})
def random_erasing(image, p: float = 0.25, scale: tuple = transforms.ERASE_SCALE,
                   ratio: tuple = transforms.ERASE_RATIO,
                   value: Literal[transforms.ERASE_VALUES] = 'mean', *, seed):
  """torchvision ``RandomErasing(p, scale, ratio)`` (``transforms/transforms.py``) before
  normalisation: value 'mean' (the ImageNet mean, torchvision's value=0 once normalised) or
  'random' (per-pixel normal noise in normalised space, clipped: timm
  ``random_erasing.py``'s mode='pixel')."""
  return transforms.random_erasing(image, seed, p, scale, ratio, value)


# ---------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """Parsed ops with their arguments; call it on one uint8 [H, W, 3] image."""
  spec: str
  ops: tuple[tuple[Op, dict[str, Any]], ...]

  @property
  def num_random(self) -> int:
    return sum(op.random for op, _ in self.ops)

  def _seeds(self, seed) -> list:
    if self.num_random <= 1:
      return [seed]
    tf = _import_tf()
    return tf.unstack(tf.random.experimental.stateless_split(seed, self.num_random))

  def __call__(self, image, seed=None):
    """uint8 [H, W, 3], stateless seed int64 [2] (random ops) -> uint8 [S, S, 3]."""
    seeds = iter(self._seeds(seed))
    for op, kwargs in self.ops:
      image = op.fn(image, **kwargs, **({'seed': next(seeds)} if op.random else {}))
    return image

  def draw(self, shape, seed=None) -> dict:
    """The random ops' parameters alone, no pixels (the device path applies them).

    Args:
      shape: the input's [H, W, ...] (int32 tensor or pair of scalars).
      seed: the example's stateless seed, split among the random ops as ``__call__`` splits
        it, and each op's draw is the function of its seed that the op itself uses: the
        parameters are those ``__call__(image, seed)`` applies to an image of that shape.
    Returns:
      ``{f'{k}.{name}': tensor}`` for parameter ``name`` of op ``k`` (its place in ``ops``).
      The shape seen by each op is tracked through the ops before it (``Op.out_shape``).
    """
    seeds = iter(self._seeds(seed))
    params, last = {}, max([k for k, (op, _) in enumerate(self.ops) if op.random], default=-1)
    for k, (op, kwargs) in enumerate(self.ops[:last + 1]):
      if op.random:
        if op.draw is None:
          raise ValueError(f'pp op {op.fn.__name__} has no parameter draw (host only)')
        drawn = op.draw(shape, **kwargs, seed=next(seeds))
        params.update({f'{k}.{name}': value for name, value in drawn.items()})
      shape = op.out_shape(shape, kwargs)
    return params

  def output_shape(self) -> tuple:
    """The output's shape for any uint8 [H, W, 3] input, None where it depends on it."""
    size = None
    for op, kwargs in self.ops:
      size = {'same': size, 'size': kwargs.get('size'), 'any': None}[op.out]
    return (size, size, 3)


def _import_tf():
  from flowers_jax.data import pipeline
  return pipeline.import_tf()


def _valid() -> str:
  return f'valid ops: {sorted(OPS)}; presets (a whole spec): {sorted(PRESETS)}'


def _type_ok(value: Any, hint: Any) -> bool:
  if typing.get_origin(hint) is Literal:
    return value in typing.get_args(hint)
  if isinstance(value, bool):
    return hint is bool
  return isinstance(value, (int, float) if hint is float else hint)


def _describe(hint: Any) -> str:
  if typing.get_origin(hint) is Literal:
    return f'one of {typing.get_args(hint)}'
  return f'of type {hint.__name__}'


def _parse_op(text: str, key: str, spec: str, cfg: Any) -> tuple[Op, dict[str, Any]]:
  """One ``name`` or ``name(args)`` -> (op, all its arguments but the seed)."""
  where = f'config.data.{key}={spec!r}'
  try:
    call = ast.parse(text.strip(), mode='eval').body
  except SyntaxError:
    call = None
  name = call.func if isinstance(call, ast.Call) else call
  if not isinstance(name, ast.Name):
    raise ValueError(f'{where}: cannot parse {text.strip()!r} as name or name(args); '
                     + _valid())
  if name.id not in OPS:
    raise ValueError(f'{where}: unknown op {name.id!r}; {_valid()}')
  op = OPS[name.id]
  bad = f'{where}: bad arguments in {text.strip()!r}'
  try:
    args = [ast.literal_eval(a) for a in getattr(call, 'args', [])]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in getattr(call, 'keywords', [])}
  except (ValueError, TypeError, SyntaxError):
    raise ValueError(f'{bad}: not Python literals; usage: {op.usage()}') from None
  try:
    given = inspect.signature(op.fn).bind_partial(None, *args, **kwargs).arguments
  except TypeError as e:
    raise ValueError(f'{bad}: {e}; usage: {op.usage()}') from None
  if 'seed' in given:
    raise ValueError(f'{bad}: the seed is not an argument; usage: {op.usage()}')
  hints = typing.get_type_hints(op.fn)
  bound = {}
  for p in op.params():
    if p.name in given:
      bound[p.name] = given[p.name]
    elif p.name in op.from_config:
      bound[p.name] = getattr(cfg, op.from_config[p.name])
    else:
      bound[p.name] = p.default
    if not _type_ok(bound[p.name], hints[p.name]):
      raise ValueError(f'{bad}: {p.name}={bound[p.name]!r} is not'
                       f' {_describe(hints[p.name])}; usage: {op.usage()}')
    check, valid = op.checks.get(p.name, (None, ''))
    if check is not None and not check(bound[p.name]):
      raise ValueError(f'{bad}: {p.name}={bound[p.name]!r}; expected {valid}; '
                       f'usage: {op.usage()}')
  for names, (check, valid) in op.checks.items():
    if isinstance(names, tuple) and not check(*(bound[n] for n in names)):
      values = ', '.join(f'{n}={bound[n]!r}' for n in names)
      raise ValueError(f'{bad}: {values}; expected {valid}; usage: {op.usage()}')
  return op, bound


def parse(spec: str, cfg: Any, key: str = 'pp_train') -> Pipeline:
  """``config.data.<key>``'s spec -> ``Pipeline``; ValueError (one line) if invalid.

  Args:
    spec: a preset name or ops joined by '|'.
    cfg: the data config (``image_size``, ``eval_resize``, ``interpolation`` fill
      the arguments a spec leaves out).
    key: 'pp_train' or 'pp_eval' (``KEYS``: whether random ops are allowed).
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f'config.data.{key}={spec!r} is not a preset or op string; '
                     + _valid())
  text = PRESETS.get(spec.strip(), spec)
  pipe = Pipeline(spec, tuple(_parse_op(t, key, spec, cfg) for t in text.split('|')))
  if pipe.num_random and not KEYS[key]:
    raise ValueError(f'config.data.{key}={spec!r} has random ops'
                     f' {[op.fn.__name__ for op, _ in pipe.ops if op.random]}; {key} must be'
                     ' deterministic.')
  shape = pipe.output_shape()
  if shape != (cfg.image_size, cfg.image_size, 3):
    raise ValueError(f'config.data.{key}={spec!r} gives images of shape {list(shape)}, not'
                     f' image_size [{cfg.image_size}, {cfg.image_size}, 3]; end it with an op'
                     ' of that size, e.g. center_crop.')
  return pipe


@functools.lru_cache(maxsize=64)
def from_config(cfg: Any, key: str) -> Pipeline:
  """The pipeline of ``cfg.<key>`` (key in ``KEYS``; cfg a hashable ``DataConfig``)."""
  return parse(getattr(cfg, key), cfg, key)
