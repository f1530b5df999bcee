r"""A trained run's model, out of JAX: torchvision, safetensors, TF SavedModel, StableHLO.

  python -m flowers_jax.export --workdir runs/r18_ft --format stablehlo --out r18.stablehlo
      [--force] [--platforms cpu,cuda,tpu]

Reads the run as `flowers_jax.predict` does (`config.json`, `checkpoints/best`, else
`latest`, saying so; its class names) and writes one of `FORMATS`:

  torchvision  PATH (a .pth file): `torch.save` of a state_dict that
               `torchvision.models.get_model(arch, num_classes=N, **torchvision_kwargs)
               .load_state_dict(sd, strict=True)` takes (arch: `models.spec(name).torchvision`,
               torchvision_kwargs: ViT's image_size; both in the JSON). BatchNorm's
               num_batches_tracked is 0 (Flax keeps no count; only momentum=None reads it).
               Variants with layers torchvision lacks are refused with one line naming the
               option (`TORCHVISION_LACKS`: ResNet `deform` != 'none', EfficientNet
               `attention` != 'se'): no torch module of ours stands in for them; export them
               in one of the other formats.
  safetensors  PATH (a .safetensors file): the Flax variables under their Flax paths
               ('params/layer1/0/conv1/kernel', 'batch_stats/bn1/mean'), as trained; metadata
               'model', 'num_classes', 'options' (JSON) and 'flowers_jax' (the JSON below).
               `read_safetensors(PATH) -> (variables, metadata)`.
  savedmodel   PATH/ (a directory): a TF SavedModel through `jax2tf.convert` (variables as
               tf.Variables, so ViT-L stays under protobuf's 2 GB), any batch size (run in
               chunks of SAVEDMODEL_CHUNK images: jax 0.12's symbolic-batch serialisation is
               newer StableHLO than TensorFlow 2.21 reads).
               Signatures 'serving_default' (images: uint8) and 'normalized' (images: float32,
               normalised), each -> {'logits': float32 [B, N], 'probabilities': softmax}.
  stablehlo    PATH (a file): `jax.export.export(jax.jit(f))(uint8 [b, S, S, 3]).serialize()`,
               the variables embedded as constants; `jax.export.deserialize(bytearray(blob))
               .call(images)` -> float32 logits [b, N] for any b >= 1.

savedmodel and stablehlo are lowered for `--platforms` (default cpu,cuda,tpu: one artifact
runs on any of them). They compute in the run's `train.dtype`, as predict does.

Input contract (savedmodel 'serving_default', stablehlo): uint8 RGB images [B, S, S, 3],
already in the run's eval view (shorter side resized to `eval_resize` with antialiased
`interpolation`, center crop S; `eval_transform`). The exported function normalises them
itself: x / 255, minus `mean`, over `std`, the run's `data.mean` / `data.std` (ImageNet's for a
run whose config.json predates those keys: such runs normalised with ImageNet's values).
torchvision and safetensors are weights: their models take float32 images normalised so,
[B, 3, S, S] for torch, [B, S, S, 3] for Flax.

The JSON beside (one rule, `sidecar_path`): a file PATH has PATH.json beside it, a directory
PATH (savedmodel) has PATH/flowers_jax.json inside it. It holds the format, the model (name,
num_classes, options, dtype, torchvision arch and kwargs), the class names, the eval transform
(`eval_transform`), each entry point's input and output, the platforms, and the run (workdir,
checkpoint best/latest, step, epoch, val_accuracy): `describe`.

ONNX, from a torchvision export (torch's ONNX exporter needs `pip install onnx onnxscript`,
which this project does not depend on; its TorchScript exporter, dynamo=False, is deprecated):

  net = torchvision.models.get_model('resnet18', num_classes=102)
  net.load_state_dict(torch.load('r18.pth'), strict=True)
  torch.onnx.export(net.eval(), (torch.zeros(2, 3, 224, 224),), 'r18.onnx',
                    input_names=['images'], output_names=['logits'],
                    dynamic_shapes=({0: torch.export.Dim('batch')},))

Errors are one line, exit status 2: a missing run, an unknown format (the valid ones
named), an --out that exists (without --force; --force replaces a file, or a directory that is
an earlier export), a refused variant, a missing optional package. The output is written in a
temporary folder beside --out and moved into place when complete.

Library use:

  info = export.export('runs/r18_ft', 'stablehlo', 'r18.stablehlo')   # the JSON written
  export.eval_transform(config)       # {'image_size', 'eval_resize', ..., 'mean', 'std'}
  export.torchvision_refusal(config)  # None, or why --format torchvision refuses
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from flowers_jax import predict

LAYOUT_VERSION = 1  # of the JSON beside an export
SIDECAR_NAME = 'flowers_jax.json'  # the JSON inside a directory export
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # what jax.export lowers for
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
OTHER_FORMATS = 'safetensors, savedmodel or stablehlo'
# Model option -> (the value that builds torchvision's architecture, what another value adds).
TORCHVISION_LACKS: dict[str, tuple[Any, str]] = {
    'deform': ('none', 'deformable convolutions'),
    'attention': ('se', 'ECA / spatial attention gates in place of squeeze-excitation'),
}
TORCHVISION_KWARGS = ('image_size',)  # model options torchvision's constructor takes (ViT)


class ExportError(ValueError):
  """A user error: printed as one line, exit status 2."""


# ----------------------------------------------------------------- the run's transform


def _data_config(config):
  """`config.data` resolved by `dataset.DataConfig.parse` (eval_resize 0, interpolation '',
  mean / std () filled in); keys an older config.json lacks take `config.BASE`'s values
  (`predict.over_defaults`, as `predict.load_config` does)."""
  from flowers_jax import config as config_lib
  from flowers_jax.data import dataset
  return dataset.DataConfig.parse(predict.over_defaults(config_lib.BASE['data'],
                                                        dict(config.data)))


def _mean_std_from(config) -> str:
  data = config.data
  if 'mean' not in data or 'std' not in data:
    return ("ImageNet's: this run's config.json predates data.mean / data.std, and such runs "
            "normalised with ImageNet's values")
  if not len(data.mean) or not len(data.std):
    return ("ImageNet's: data.mean / data.std are () (the default when the weights set none, "
            'and what every run used before those keys existed)')
  return "the run's data.mean / data.std"


def eval_transform(config) -> dict:
  """The run's eval view and normalisation, as the JSON beside an export records them.

  Returns {'pp_eval': the config's spec, 'ops': its ops ('resize_small|center_crop': shorter
  side -> eval_resize, center crop image_size), 'image_size', 'eval_resize', 'interpolation',
  'antialias': True, 'mean', 'std' (3 floats each, of pixels in [0, 1]), 'mean_std_from'}.
  """
  from flowers_jax.data import pp
  cfg = _data_config(config)
  return {'pp_eval': cfg.pp_eval, 'ops': pp.PRESETS.get(cfg.pp_eval, cfg.pp_eval),
          'image_size': cfg.image_size, 'eval_resize': cfg.eval_resize,
          'interpolation': cfg.interpolation, 'antialias': True,
          'mean': [float(m) for m in cfg.mean], 'std': [float(s) for s in cfg.std],
          'mean_std_from': _mean_std_from(config)}


# ----------------------------------------------------------------- the exported function


# Entry kind -> the dtype of the images it takes: uint8 pixels (normalised inside, with the
# run's mean / std) or float32 already normalised (`normalization.normalize` passes floats on).
INPUTS: dict[str, str] = {'uint8': 'uint8', 'normalized': 'float32'}


def logits_fn(run: predict.Run, kind: str = 'uint8') -> Callable:
  """`f(variables, images [B, S, S, 3] of dtype INPUTS[kind]) -> float32 logits [B, N]`:
  predict's own function (`predict.Run.logits_fn`: uint8 normalised with the run's mean / std,
  the `eval_transform`'s), so an export computes what `predict` does."""
  assert kind in INPUTS, kind
  return run.logits_fn()


def _image_spec(run: predict.Run, kind: str):
  import jax
  size = run.config.data.image_size
  shape = jax.export.symbolic_shape(f'b, {size}, {size}, 3')
  return jax.ShapeDtypeStruct(shape, np.dtype(INPUTS[kind]))


def stablehlo(run: predict.Run, platforms: Sequence[str] = DEFAULT_PLATFORMS):
  """`jax.export.Exported` of uint8 [b, S, S, 3] -> float32 logits [b, N], variables embedded."""
  import jax
  f, variables = logits_fn(run, 'uint8'), run.variables
  return jax.export.export(jax.jit(lambda images: f(variables, images)),
                           platforms=tuple(platforms))(_image_spec(run, 'uint8'))


# ----------------------------------------------------------------- torchvision


def torchvision_refusal(config) -> str | None:
  """Why `config`'s model has no torchvision counterpart (one line), or None."""
  from flowers_jax import models
  arch = models.spec(config.model.name).torchvision
  for option, (plain, adds) in TORCHVISION_LACKS.items():
    value = config.model.get(option, plain)
    if value != plain:
      return (f'--format torchvision: model.{option}={value!r} adds {adds}, which '
              f"torchvision's {arch} lacks; export it as {OTHER_FORMATS} instead")
  return None


def torchvision_kwargs(config) -> dict:
  """The keyword arguments of torchvision's constructor besides num_classes ({'image_size'})."""
  return {k: config.model[k] for k in TORCHVISION_KWARGS if k in config.model}


def _import_torch():
  try:
    import torch
    import torchvision
  except ImportError:
    raise ExportError('--format torchvision needs torch and torchvision (pip install '
                      'flowers_jax[torch])') from None
  return torch, torchvision


def torchvision_model(config):
  """torchvision's (untrained) model of `config`'s architecture and head size."""
  from flowers_jax import models
  _, torchvision = _import_torch()
  return torchvision.models.get_model(models.spec(config.model.name).torchvision,
                                      num_classes=config.model.num_classes,
                                      **torchvision_kwargs(config))


def torchvision_state_dict(run: predict.Run) -> dict:
  """{torch key: torch.Tensor} of `run`'s variables, checked with load_state_dict(strict=True)."""
  from flowers_jax import convert, train
  torch, _ = _import_torch()
  arrays = convert.flax_to_torchvision(run.config.model.name, run.variables,
                                       **train.model_options(run.config.model))
  net = torchvision_model(run.config)
  fresh = net.state_dict()
  missing = [k for k in fresh if k not in arrays and not k.endswith('.num_batches_tracked')]
  extra = sorted(set(arrays) - set(fresh))
  if missing or extra:
    raise ExportError(f'{run.config.model.name} does not map onto torchvision: missing '
                      f'{missing[:3]}, extra {extra[:3]}')
  sd = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(v.dtype) if k in arrays else v
        for k, v in fresh.items()}
  net.load_state_dict(sd, strict=True)
  return sd


def _write_torchvision(run: predict.Run, path: str, info: dict) -> None:
  torch, _ = _import_torch()
  torch.save(torchvision_state_dict(run), path)


# ----------------------------------------------------------------- safetensors


def _import_safetensors():
  try:
    from safetensors import numpy as st_numpy
  except ImportError:
    raise ExportError('--format safetensors needs the safetensors package (pip install '
                      'safetensors; flowers_jax[torch] brings it)') from None
  return st_numpy


def _write_safetensors(run: predict.Run, path: str, info: dict) -> None:
  import flax
  flat = flax.traverse_util.flatten_dict(dict(run.variables), sep='/')
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
  metadata = {'model': info['model']['name'], 'num_classes': str(info['model']['num_classes']),
              'options': json.dumps(info['model']['options']), 'flowers_jax': json.dumps(info)}
  _import_safetensors().save_file(arrays, path, metadata=metadata)


def read_safetensors(path: str) -> tuple[dict, dict]:
  """(variables {'params': ..., 'batch_stats': ...} of numpy arrays, metadata) of an export."""
  import flax
  from safetensors import safe_open
  flat = _import_safetensors().load_file(path)
  with safe_open(path, framework='numpy') as f:
    metadata = dict(f.metadata() or {})
  return flax.traverse_util.unflatten_dict(flat, sep='/'), metadata


# ----------------------------------------------------------------- TF SavedModel


# Images per call of the jax2tf function in a SavedModel. Its batch is static: with a symbolic
# batch, jax (0.12) serialises a `shape_assertion` custom call as StableHLO's custom_call_v2,
# which TensorFlow 2.21's XlaCallModule (StableHLO 1.13.7) cannot read ("unregistered operation
# 'vhlo.custom_call_v2'"; CI, Python 3.12). The serving function pads any batch to whole chunks
# and maps over them, so the SavedModel still takes any batch size.
SAVEDMODEL_CHUNK = 8


def _serving_function(tf, converted, tf_variables, spec, num_classes: int):
  """images [n, S, S, 3] (any n) -> {'logits', 'probabilities'} [n, N], `converted` called on
  chunks of SAVEDMODEL_CHUNK images (the last one zero-padded, its padding rows cut)."""
  chunk, image_shape = SAVEDMODEL_CHUNK, spec.shape[1:]

  @tf.function(input_signature=[spec], autograph=False)
  def serve(images):
    n = tf.shape(images)[0]
    padding = tf.zeros(tf.concat([[(-n) % chunk], image_shape], 0), images.dtype)
    chunks = tf.reshape(tf.concat([images, padding], 0), [-1, chunk, *image_shape])
    logits = tf.map_fn(lambda x: converted(tf_variables, x), chunks,
                       fn_output_signature=tf.TensorSpec([chunk, num_classes], tf.float32))
    logits = tf.reshape(logits, [-1, num_classes])[:n]
    return {'logits': logits, 'probabilities': tf.nn.softmax(logits)}
  return serve


def _write_savedmodel(run: predict.Run, path: str, info: dict) -> None:
  import jax
  from flowers_jax.data import tf_import
  tf = tf_import.import_tf()  # before jax2tf imports it: GPUs hidden from TensorFlow
  from jax.experimental import jax2tf
  size, module = run.config.data.image_size, tf.Module()
  tf_variables = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False),
                                       jax.tree.map(np.asarray, dict(run.variables)))
  module.model_variables = tf.nest.flatten(tf_variables)  # tracked, so saved
  signatures = {}
  for name, kind in FORMATS['savedmodel'].entries.items():
    converted = jax2tf.convert(logits_fn(run, kind), with_gradient=False,
                               native_serialization_platforms=tuple(info['platforms']))
    spec = tf.TensorSpec([None, size, size, 3], tf.as_dtype(INPUTS[kind]), name='images')
    signatures[name] = _serving_function(tf, converted, tf_variables, spec,
                                         int(run.config.model.num_classes))
    setattr(module, name, signatures[name])
  tf.saved_model.save(module, path, signatures=signatures)


def _write_stablehlo(run: predict.Run, path: str, info: dict) -> None:
  with open(path, 'wb') as f:
    f.write(stablehlo(run, info['platforms']).serialize())


def read_stablehlo(path: str):
  """The `jax.export.Exported` of a stablehlo export: `.call(uint8 images)` -> logits."""
  import jax
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


# ----------------------------------------------------------------- the formats


@dataclasses.dataclass(frozen=True)
class Format:
  """One export format.

  write(run, path, info): writes the artifact at `path` (`info`: the JSON, `describe`);
  directory: whether it is a directory (the JSON goes inside) or a file (the JSON beside);
  entries: entry point -> the images it takes: 'uint8' | 'normalized' (float32 NHWC) |
    'normalized_nchw' (float32, torch's layout);
  outputs: what each entry returns; lowered: compiled for --platforms;
  refuse(config): None, or why this run cannot be exported so (one line).
  """
  write: Callable[[predict.Run, str, dict], None]
  directory: bool
  entries: dict[str, str]
  outputs: str
  lowered: bool = False
  refuse: Callable[[Any], str | None] = lambda config: None


LOGITS = 'logits: float32 [batch, num_classes]'
FORMATS: dict[str, Format] = {
    'torchvision': Format(_write_torchvision, False, {'forward': 'normalized_nchw'}, LOGITS,
                          refuse=torchvision_refusal),
    'safetensors': Format(_write_safetensors, False, {'apply': 'normalized'},
                          f'{LOGITS} (models.create(...).apply(variables, x, train=False)[0])'),
    'savedmodel': Format(_write_savedmodel, True,
                         {'serving_default': 'uint8', 'normalized': 'normalized'},
                         f'{{{LOGITS}, probabilities: softmax of the logits}}', lowered=True),
    'stablehlo': Format(_write_stablehlo, False, {'call': 'uint8'}, LOGITS, lowered=True),
}


def _entry_input(kind: str, size: int) -> dict:
  """The input contract of an entry point taking images of `kind`."""
  nchw = kind == 'normalized_nchw'
  shape = ['batch', 3, size, size] if nchw else ['batch', size, size, 3]
  how = ('uint8 RGB pixels of the eval view; normalised inside with transform.mean / std'
         if kind == 'uint8' else
         'float32 RGB of the eval view, normalised by the caller: (x / 255 - mean) / std')
  return {'dtype': 'uint8' if kind == 'uint8' else 'float32', 'layout': 'NCHW' if nchw
          else 'NHWC', 'shape': shape, 'contract': how}


def sidecar_path(path: str, directory: bool) -> str:
  """Where an export's JSON goes: PATH/flowers_jax.json in a directory, PATH.json beside a
  file."""
  return os.path.join(path, SIDECAR_NAME) if directory else path + '.json'


def describe(run: predict.Run, fmt: str, path: str, platforms: Sequence[str]) -> dict:
  """The JSON written beside (or inside) an export of `run` in format `fmt` at `path`."""
  from flowers_jax import models, train
  f, c, size = FORMATS[fmt], run.config, run.config.data.image_size
  return {
      'flowers_jax_export': LAYOUT_VERSION, 'format': fmt, 'path': os.path.basename(path),
      'model': {'name': c.model.name, 'num_classes': c.model.num_classes,
                'options': dict(train.model_options(c.model)), 'dtype': c.train.dtype,
                'torchvision': models.spec(c.model.name).torchvision,
                'torchvision_kwargs': torchvision_kwargs(c)},
      'class_names': list(run.class_names), 'class_names_from': run.names_from,
      'transform': eval_transform(c),
      'inputs': {name: _entry_input(kind, size) for name, kind in f.entries.items()},
      'outputs': f.outputs,
      'platforms': list(platforms) if f.lowered else None,
      'run': {'workdir': os.path.abspath(run.workdir), 'checkpoint': run.checkpoint,
              **{k: run.meta.get(k) for k in ('step', 'epoch', 'val_accuracy')}},
  }


# ----------------------------------------------------------------- writing


def _format(fmt: str) -> Format:
  if fmt not in FORMATS:
    raise ExportError(f'unknown --format {fmt!r}; valid: {", ".join(FORMATS)}')
  return FORMATS[fmt]


def _platforms(platforms: Sequence[str] | str) -> tuple[str, ...]:
  names = tuple(p.strip() for p in (platforms.split(',') if isinstance(platforms, str)
                                    else platforms) if p.strip())
  bad = [p for p in names if p not in PLATFORMS]
  if bad or not names:
    raise ExportError(f'--platforms {",".join(names)!r}: valid ones are {", ".join(PLATFORMS)}')
  return names


def _check_out(path: str, f: Format, force: bool) -> None:
  """ExportError unless `path` (and its JSON) may be written: new, or replaced with --force."""
  taken = [p for p in (path, sidecar_path(path, f.directory)) if os.path.lexists(p)]
  if not taken:
    return
  if not force:
    raise ExportError(f'--out {taken[0]} exists; pass --force to replace it')
  if os.path.isdir(path) != f.directory and os.path.lexists(path):
    kind = 'a directory' if os.path.isdir(path) else 'a file'
    raise ExportError(f'--out {path} is {kind}; this format writes '
                      f'{"a directory" if f.directory else "a file"}; not replacing it')
  if f.directory and not os.path.isfile(sidecar_path(path, True)):
    raise ExportError(f'--out {path} is a directory but no export (it has no {SIDECAR_NAME}); '
                      'not replacing it')


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _plain_mode(path: str) -> None:
  """The mode open() would give `path` (safetensors writes its files 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _write(run: predict.Run, f: Format, path: str, info: dict) -> None:
  """Writes the artifact and its JSON in a temporary folder beside `path`, then moves them."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    staged = os.path.join(tmp, os.path.basename(os.path.abspath(path)))
    f.write(run, staged, info)
    if not f.directory:
      _plain_mode(staged)
    with open(sidecar_path(staged, f.directory), 'w') as out:
      json.dump(info, out, indent=2)
    moves = [(staged, path)]
    if not f.directory:  # a file's JSON lies beside it
      moves.append((sidecar_path(staged, False), sidecar_path(path, False)))
    for src, dst in moves:
      _remove(dst)
      os.replace(src, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def export(workdir: str, fmt: str, out: str, *, force: bool = False,
           platforms: Sequence[str] | str = DEFAULT_PLATFORMS) -> dict:
  """Exports `workdir`'s best (else latest) checkpoint in format `fmt` to `out`.

  Checks before restoring anything: the format, the platforms, the run's config, the
  format's refusal (torchvision: `torchvision_refusal`), `out` (new, or `force`). Returns
  the JSON written beside the export (`describe`). Raises ExportError / PredictError (user
  errors, one line).
  """
  f, platforms, out = _format(fmt), _platforms(platforms), os.path.abspath(os.fspath(out))
  reason = f.refuse(predict.load_config(workdir))
  if reason:
    raise ExportError(reason)
  _check_out(out, f, force)
  run = predict.load_run(workdir)
  info = describe(run, fmt, out, platforms)
  _write(run, f, out, info)
  return info


# ----------------------------------------------------------------- command line


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m flowers_jax.export',
      description="A run's model as a torchvision state_dict, safetensors, a TF SavedModel or "
                  'StableHLO, with its class names and eval transform in a JSON beside it.')
  parser.add_argument('--workdir', required=True, help='a run directory of flowers_jax.main')
  parser.add_argument('--format', required=True, help=' | '.join(FORMATS))
  parser.add_argument('--out', required=True, help='the file (directory for savedmodel)')
  parser.add_argument('--force', action='store_true', help='replace an existing --out')
  parser.add_argument('--platforms', default=','.join(DEFAULT_PLATFORMS),
                      help='savedmodel / stablehlo: comma-separated, of ' + ', '.join(PLATFORMS))
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    info = export(args.workdir, args.format, args.out, force=args.force,
                  platforms=args.platforms)
  except (ExportError, predict.PredictError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  r = info['run']
  print(f'wrote {args.out} ({args.format}: {info["model"]["name"]}, {r["checkpoint"]} checkpoint '
        f'of step {r["step"]}) and {sidecar_path(args.out, FORMATS[args.format].directory)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
