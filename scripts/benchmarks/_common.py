"""Shared code of the `train` and `eval` benchmarks: flowers_jax against torchvision, per model.

For each model and framework, on the default device (JAX) and CUDA or CPU (torch):
  jax    float32 / bfloat16  the project's own step (`steps.make_train_step` or
                             `evaluators.make_eval_step`, compiled by `parallel.make()`, the
                             optimizer `optim.make_optimizer` builds from the base config's
                             `optim` (`flowers_jax.config.BASE`: SGD momentum 0.9, wd 1e-4)),
                             compute dtype by `models.create(dtype=)`;
  torch  float32             torchvision model (`weights=None`), SGD with the base config's lr,
                             momentum and weight decay on the >1-D params (like optim.py),
                             cross-entropy;
         amp+channels_last   CUDA only: autocast bfloat16, model and input channels_last;
         compile             `torch.compile` of the best torch row above (CUDA: on by default;
                             CPU: opt-in with --torch-compile on, inductor compiles for minutes);
the deform variants' torch reference puts `torchvision.ops.DeformConv2d` (with a zero-initialised
offset conv of the same geometry) where `flowers_jax/models/resnet.py` puts its DeformConv.

Batches are synthetic, made once in memory and kept on the device (no input pipeline, no
tensorflow). Each row: first step (JAX: trace + compile + run; torch: the first iteration,
with torch.compile's compile), then --warmup steps, then --steps steps timed between two device
synchronisations (`jax.block_until_ready`, `torch.cuda.synchronize`). Reported per row:
ms/step, img/s, first-step s, peak memory, achieved TFLOP/s (`flowers_jax.flops`, training =
3x forward) and MFU where the device's peak is known. Peak memory:
  jax GPU/TPU  `device.memory_stats()['peak_bytes_in_use']`, the process's running maximum
               (exact for the first JAX row of a process; the rows run bfloat16 before
               float32, so each is that row's own peak unless an earlier row used more);
  jax CPU      the compiled step's `memory_analysis()`: arguments + outputs + temporaries
               - aliased (donated) bytes, XLA's own plan, not the process RSS;
  torch CUDA   `torch.cuda.max_memory_allocated()` (reset per row); torch CPU: n/a.
The ratio column is JAX ms/step over the torch reference's (float32 against float32,
bfloat16 against amp+channels_last, or against float32 where AMP does not run): > 1 means
JAX is slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

NUM_CLASSES = 102
MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Case:
  """A benchmarked model: flowers_jax name and options, torchvision name, deform placement."""
  jax_name: str
  torch_name: str
  options: tuple = ()
  deform: str | None = None
  sized: bool = False  # the model is built for one image size (ViT: `image_size`)


MODELS = {
    'resnet18': Case('resnet18', 'resnet18'),
    'efficientnet_b0': Case('efficientnet_b0', 'efficientnet_b0'),
    'vit_b16': Case('vit_b16', 'vit_b_16', sized=True),
    'resnet18_deform_after_conv1': Case('resnet18', 'resnet18', (('deform', 'after_conv1'),),
                                        deform='after_conv1'),
    'resnet18_deform_parallel_conv1': Case('resnet18', 'resnet18',
                                           (('deform', 'parallel_conv1'),),
                                           deform='parallel_conv1'),
}
DTYPES = ('float32', 'bfloat16')
FRAMEWORKS = ('torch', 'jax')


# --------------------------------------------------------------------------- options ---


def _csv(valid: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
  def parse(text: str) -> list[str]:
    items = [s.strip() for s in text.split(',') if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
      raise argparse.ArgumentTypeError(f'unknown {what} {bad or text!r}; valid: '
                                       f'{",".join(valid)}')
    return items
  return parse


def parse(argv: list[str], mode: str) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=f'benchmark.py {mode}',
      description=f'{mode} steps/s of flowers_jax vs torchvision, side by side.')
  p.add_argument('--models', type=_csv(tuple(MODELS), 'model'), default=list(MODELS))
  p.add_argument('--batch', type=int, default=32, help='global batch size')
  p.add_argument('--size', type=int, default=224, help='image height = width')
  p.add_argument('--steps', type=int, default=10, help='timed steps per row')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after the first')
  p.add_argument('--dtypes', type=_csv(DTYPES, 'dtype'), default=list(DTYPES),
                 help='JAX compute dtypes; bfloat16 also enables torch AMP on CUDA')
  p.add_argument('--frameworks', type=_csv(FRAMEWORKS, 'framework'), default=list(FRAMEWORKS))
  p.add_argument('--parallel', choices=('sharded', 'pmap'), default='sharded',
                 help='flowers_jax.parallel strategy for the JAX step')
  p.add_argument('--torch-compile', choices=('auto', 'on', 'off', 'only'), default='auto',
                 help='auto: on CUDA only (on CPU inductor takes minutes per model); '
                      'only: no other torch row')
  p.add_argument('--threads', type=int, default=0,
                 help='CPU: pin the process to this many cores (both frameworks); 0: all')
  p.add_argument('--out', type=Path, help='write config, environment and rows as JSON here')
  args = p.parse_args(argv)
  args.mode = mode
  return args


# ------------------------------------------------------------------ environment ---


def ensure_ml_collections() -> str:
  """Registers a stand-in `ml_collections` module where the package is not installed.

  `flowers_jax.steps` imports it at module level for type hints only; the benchmark passes
  plain namespaces built from `flowers_jax.config.BASE` (`base_namespace`), so a module with
  an empty `ConfigDict` class lets the step import on a machine with only jax + torch.
  Returns 'installed' or 'stand-in'.
  """
  try:
    import ml_collections  # noqa: F401
    return 'installed'
  except ImportError:
    pass
  stub = types.ModuleType('ml_collections')
  stub.ConfigDict = type('ConfigDict', (dict,), {})
  sys.modules['ml_collections'] = stub
  return 'stand-in'


def pin_threads(n: int) -> None:
  """Restricts the process to its first `n` allowed cores, before jax / torch start.

  XLA's CPU thread pool sizes itself from the affinity mask and torch is told `n`; on a shared
  machine torch's OpenMP threads swing 2-10x when other jobs take a core (its barriers spin),
  so `--threads 1` is the steadier comparison there.
  """
  if n <= 0:
    return
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
  try:
    import torch
    torch.set_num_threads(n)
  except ImportError:
    pass


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment(args) -> dict:
  env = {'python': platform.python_version(), 'cpu': cpu_model(),
         'cores': len(os.sched_getaffinity(0)),
         'load_avg_start': os.getloadavg()[0]}
  if 'jax' in args.frameworks:
    import jax
    import flax
    d = jax.devices()[0]
    env.update(jax=jax.__version__, flax=flax.__version__, jax_device=d.device_kind,
               jax_platform=d.platform, jax_devices=jax.device_count())
  if 'torch' in args.frameworks:
    import torch
    import torchvision
    env.update(torch=torch.__version__, torchvision=torchvision.__version__,
               torch_threads=torch.get_num_threads(),
               torch_device=(torch.cuda.get_device_name() if torch.cuda.is_available()
                             else 'cpu'))
  return env


# ----------------------------------------------------------------------- timing ---


def write_outputs(out: Path | None, args, text: str, **payload) -> None:
  """`out`.md (the printed tables) and `out`.json (the config, i.e. the args, and `payload`)."""
  if not out:
    return
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix('.md').write_text(text + '\n')
  config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  out.with_suffix('.json').write_text(json.dumps(
      {'config': config, **payload}, indent=2, default=str) + '\n')


def time_steps(step: Callable[[], Any], sync: Callable[[Any], None], warmup: int,
               steps: int) -> tuple[float, float]:
  """Runs `step` 1 + warmup + steps times; returns (first step s, timed ms per step).

  `step()` returns what `sync` waits for (the device work of all steps so far).
  """
  t0 = time.perf_counter()
  sync(step())
  first = time.perf_counter() - t0
  out = None
  for _ in range(warmup):
    out = step()
  sync(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = step()
  sync(out)
  return first, (time.perf_counter() - t0) / max(steps, 1) * 1e3


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict:
  """image [B, H, W, 3] float32 N(0, 1) (already 'normalised'), label [B] int32, mask [B]."""
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          'label': rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
          'mask': np.ones(batch, np.float32)}


def row(args, name: str, framework: str, variant: str, dtype: str, device_kind: str,
        first_s: float, ms: float, peak: int | None, peak_kind: str, **extra) -> dict:
  """One result row with img/s, achieved TFLOP/s and MFU from `flowers_jax.flops`."""
  from flowers_jax import flops
  training = args.mode == 'train'
  ips = args.batch / (ms / 1e3)
  per_image = (flops.train_gflops if training else flops.forward_gflops)(name, args.size)
  return dict(model=name, framework=framework, variant=variant, dtype=dtype,
              device=device_kind, ms_per_step=ms, images_per_s=ips, first_step_s=first_s,
              peak_bytes=peak, peak_kind=peak_kind, tflops=ips * per_image / 1e3,
              mfu=flops.mfu(name, args.size, ips, device_kind, dtype, training=training),
              **extra)


# -------------------------------------------------------------------------- JAX ---


def namespace(tree: dict) -> types.SimpleNamespace:
  """A nested dict as nested namespaces: `namespace(BASE).optim.lr` like `config.optim.lr`."""
  return types.SimpleNamespace(**{k: namespace(v) if isinstance(v, dict) else v
                                  for k, v in tree.items()})


def base_namespace() -> types.SimpleNamespace:
  """The base config (`flowers_jax.config.BASE`, without ml_collections) as namespaces."""
  from flowers_jax.config import BASE
  return namespace(BASE)


def _jax_setup(args, name: str, dtype: str, strategy):
  """Model, host state and compiled-to-be step function for `args.mode`."""
  import jax
  import jax.numpy as jnp
  from flowers_jax import evaluators, models, optim, steps

  case = MODELS[name]
  options = dict(case.options, **({'image_size': args.size} if case.sized else {}))
  model = models.create(case.jax_name, num_classes=NUM_CLASSES,
                        bn_axis_name=strategy.axis_name, dtype=getattr(jnp, dtype), **options)
  x = jnp.zeros((1, args.size, args.size, 3), jnp.float32)
  keys = dict(zip(('params', 'dropout'), jax.random.split(jax.random.key(0))))
  variables = jax.device_get(jax.jit(lambda: model.init(keys, x, train=False))())
  config = base_namespace()
  tx = optim.make_optimizer(config.optim, variables['params'],
                            total_steps=1 + args.warmup + args.steps, freeze=config.train.freeze,
                            head_pattern=models.HEAD_PATTERNS[case.jax_name])
  state = steps.TrainState.create(variables, tx, seed=config.seed)
  if args.mode == 'train':
    fn = strategy.compile(steps.make_train_step(model, tx, config.train,
                                                axis_name=strategy.axis_name))
  else:
    evals = evaluators.get(config.evals.names)
    fn = strategy.compile(evaluators.make_eval_step(model, evals, config.evals,
                                                    axis_name=strategy.axis_name),
                          donate_state=False)
  return state, fn


def _xla_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of a compiled executable."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend / jax version reports it
    return None


def bench_jax(args, name: str, dtype: str) -> dict:
  import jax
  from flowers_jax import parallel

  strategy = parallel.make(args.parallel)
  state, fn = _jax_setup(args, name, dtype, strategy)
  batch = strategy.put_batch(synthetic_batch(args.batch, args.size))
  state = strategy.put_state(state)
  t0 = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  xla = _xla_bytes(compiled)
  box = [state]

  def train_step():
    box[0], metrics = compiled(box[0], batch)
    return box[0], metrics

  def eval_step():
    return compiled(box[0], batch)

  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='.*donated buffers were not usable.*')
    first, ms = time_steps(train_step if args.mode == 'train' else eval_step,
                           jax.block_until_ready, args.warmup, args.steps)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    peak, kind = stats['peak_bytes_in_use'], 'peak_bytes_in_use (process max)'
  else:
    peak, kind = xla, 'XLA args+out+temp'
  return row(args, name, 'jax', dtype, dtype, device.device_kind, compile_s + first, ms,
             peak, kind, compile_s=compile_s, xla_bytes=xla, parallel=args.parallel)


# ------------------------------------------------------------------------ torch ---


def _torch_deform_modules():
  """torch modules for the deform placements of `flowers_jax/models/resnet.py`."""
  import torch
  import torchvision

  class Deform(torch.nn.Module):
    """DeformConv2d k x k / stride, padding k // 2, offsets from a zero-initialised conv."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
      super().__init__()
      self.offset = torch.nn.Conv2d(cin, 2 * k * k, k, stride, k // 2)
      torch.nn.init.zeros_(self.offset.weight)
      torch.nn.init.zeros_(self.offset.bias)
      self.conv = torchvision.ops.DeformConv2d(cin, cout, k, stride, k // 2)

    def forward(self, x):
      return self.conv(x, self.offset(x))

  class Parallel(torch.nn.Module):
    """conv1(x) + deform(x)."""

    def __init__(self, conv1, deform):
      super().__init__()
      self.conv1, self.deform = conv1, deform

    def forward(self, x):
      return self.conv1(x) + self.deform(x)

  return {
      'after_conv1': lambda conv1: torch.nn.Sequential(conv1, Deform(64, 64, 3, 1)),
      'parallel_conv1': lambda conv1: Parallel(conv1, Deform(3, 64, 7, 2)),
  }


def torch_model(name: str, size: int):
  """The torchvision model of `name` (random init, 102 classes), deform placed like Flax."""
  import torchvision

  case = MODELS[name]
  kwargs = {'image_size': size} if case.sized else {}
  model = torchvision.models.get_model(case.torch_name, weights=None, num_classes=NUM_CLASSES,
                                       **kwargs)
  if case.deform:
    model.conv1 = _torch_deform_modules()[case.deform](model.conv1)
  return model


def _torch_optimizer(model):
  """SGD with the base config's lr, momentum and weight decay, the decay on the >1-D params
  only (as optim.py does)."""
  import torch
  o = base_namespace().optim
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.ndim > 1], 'weight_decay': o.weight_decay},
            {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}]
  return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


TORCH_VARIANTS = {  # variant -> (autocast dtype or None, channels_last)
    'float32': (None, False),
    'amp+channels_last': ('bfloat16', True),
}


def _torch_step(args, model, x, y, autocast: str | None, device: str):
  """A closure running one train (or eval) step; returns what to sync on."""
  import torch
  import torch.nn.functional as F

  def forward():
    if autocast is None:
      return model(x)
    with torch.autocast(device, dtype=getattr(torch, autocast)):
      return model(x)

  if args.mode == 'eval':
    model.eval()

    def eval_step():
      with torch.inference_mode():
        return forward().float().argmax(-1)
    return eval_step

  model.train()
  opt = _torch_optimizer(model)

  def train_step():
    opt.zero_grad(set_to_none=True)
    logits = forward()
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return loss
  return train_step


def bench_torch(args, name: str, variant: str, compile_: bool = False) -> dict:
  import torch

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  autocast, channels_last = TORCH_VARIANTS[variant]
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = torch_model(name, args.size).to(device, memory_format=fmt)
  b = synthetic_batch(args.batch, args.size)
  x = torch.from_numpy(b['image']).permute(0, 3, 1, 2).to(device).contiguous(memory_format=fmt)
  y = torch.from_numpy(b['label']).long().to(device)
  if compile_:
    model = torch.compile(model)
  step = _torch_step(args, model, x, y, autocast, device)
  sync = (lambda _: torch.cuda.synchronize()) if device == 'cuda' else (lambda _: None)
  if device == 'cuda':
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  first, ms = time_steps(step, sync, args.warmup, args.steps)
  peak, kind = ((torch.cuda.max_memory_allocated(), 'cuda max_memory_allocated')
                if device == 'cuda' else (None, 'n/a (torch CPU allocations are not tracked)'))
  kind_name = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
  label = variant + (' compile' if compile_ else '')
  result = row(args, name, 'torch', label, autocast or 'float32', kind_name, first, ms, peak,
               kind)
  del model, step
  if device == 'cuda':
    torch.cuda.empty_cache()
  return result


# ------------------------------------------------------------------------- plan ---


def torch_plan(args) -> list[tuple[str, Callable[[str], dict] | str]]:
  """[(variant, run(name) -> row, or the reason it is skipped)] for the torch rows."""
  import torch
  cuda = torch.cuda.is_available()
  amp = cuda and 'bfloat16' in args.dtypes
  plan = [('float32', lambda n: bench_torch(args, n, 'float32'))]
  if amp:
    plan.append(('amp+channels_last', lambda n: bench_torch(args, n, 'amp+channels_last')))
  elif 'bfloat16' in args.dtypes:
    plan.append(('amp+channels_last', 'skipped: CUDA only (CPU autocast is not the reference)'))
  best = 'amp+channels_last' if amp else 'float32'
  if args.torch_compile == 'only':
    plan = []
  if {'auto': cuda, 'on': True, 'off': False, 'only': True}[args.torch_compile]:
    plan.append((f'{best} compile', lambda n: bench_torch(args, n, best, compile_=True)))
  else:
    why = ('off (--torch-compile off)' if args.torch_compile == 'off' else
           'opt-in on CPU (--torch-compile on): inductor compiles for minutes per model')
    plan.append((f'{best} compile', f'skipped: {why}'))
  return plan


def jax_plan(args):
  order = [d for d in ('bfloat16', 'float32') if d in args.dtypes]  # smaller peak first
  return [(d, lambda n, d=d: bench_jax(args, n, d)) for d in order]


def run_all(args) -> list[dict]:
  """Every (model, framework, variant) row; torch first (it frees its cache for JAX)."""
  plans = [('torch', torch_plan(args)) if 'torch' in args.frameworks else None,
           ('jax', jax_plan(args)) if 'jax' in args.frameworks else None]
  rows = []
  for name in args.models:
    for framework, plan in filter(None, plans):
      for label, run in plan:
        rows.append(_run_one(name, framework, label, run))
        print(_one_line(rows[-1]), flush=True)
  return rows


def _run_one(name: str, framework: str, label: str, run) -> dict:
  if isinstance(run, str):
    return dict(model=name, framework=framework, variant=label, skipped=run)
  try:
    return run(name)
  except Exception as e:  # noqa: BLE001 - one failing row (OOM, missing op) must not end the run
    msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
    return dict(model=name, framework=framework, variant=label, error=msg)


# ----------------------------------------------------------------------- report ---


def reference(rows: list[dict], r: dict) -> dict | None:
  """The torch row a JAX row is compared with (same model; see the module docstring)."""
  wanted = ('amp+channels_last', 'float32') if r['dtype'] == 'bfloat16' else ('float32',)
  torch_rows = {t['variant']: t for t in rows if t['model'] == r['model']
                and t['framework'] == 'torch' and 'ms_per_step' in t}
  return next((torch_rows[v] for v in wanted if v in torch_rows), None)


def _fmt(v, spec: str, scale: float = 1.0) -> str:
  return '-' if v is None else format(v * scale, spec)


def _one_line(r: dict) -> str:
  head = f'  {r["model"]:<31} {r["framework"]:<5} {r["variant"]:<24}'
  if 'ms_per_step' not in r:
    return f'{head} {r.get("skipped") or r.get("error")}'
  return (head + f' {r["ms_per_step"]:9.1f} ms {r["images_per_s"]:8.1f} img/s '
          f'first {r["first_step_s"]:6.1f} s')


def table(rows: list[dict], args) -> str:
  """Every row, with the JAX/torch step-time ratio on the JAX rows."""
  lines = [f'{args.mode} steps, batch {args.batch}, {args.size}x{args.size} px, '
           f'{args.steps} timed steps after {args.warmup} warm-up',
           f'{"model":<31} {"fw":<5} {"variant":<24} {"ms/step":>9} {"img/s":>8} '
           f'{"JAX/torch":>9} {"first s":>8} {"peak MiB":>9} {"TFLOP/s":>8} {"MFU":>6}']
  for r in rows:
    head = f'{r["model"]:<31} {r["framework"]:<5} {r["variant"]:<24}'
    if 'ms_per_step' not in r:
      lines.append(f'{head} {r.get("skipped") or r.get("error")}')
      continue
    ref = reference(rows, r) if r['framework'] == 'jax' else None
    ratio = _fmt(ref and r['ms_per_step'] / ref['ms_per_step'], '.2f')
    lines.append(f'{head} {r["ms_per_step"]:>9.1f} {r["images_per_s"]:>8.1f} {ratio:>9} '
                 f'{r["first_step_s"]:>8.1f} {_fmt(r["peak_bytes"], ".0f", 1 / MIB):>9} '
                 f'{_fmt(r["tflops"], ".3f"):>8} {_fmt(r["mfu"], ".1%"):>6}')
  return '\n'.join(lines)


def side_by_side(rows: list[dict]) -> str:
  """One line per model: img/s of each framework row and JAX/torch step-time ratios."""
  timed = [r for r in rows if 'ms_per_step' in r]
  columns = list(dict.fromkeys(f'{r["framework"]} {r["variant"]}' for r in timed))
  lines = ['img/s side by side (ratio = JAX ms/step / torch reference ms/step; > 1: JAX slower)',
           f'{"model":<31} ' + ' '.join(f'{c:>22}' for c in columns) + '  ratio f32  ratio bf16']
  for name in dict.fromkeys(r['model'] for r in timed):
    mine = {f'{r["framework"]} {r["variant"]}': r for r in timed if r['model'] == name}
    cells = [_fmt(mine.get(c, {}).get('images_per_s'), '.1f') for c in columns]
    ratios = []
    for dtype in ('float32', 'bfloat16'):
      j = mine.get(f'jax {dtype}')
      ref = j and reference(timed, j)
      ratios.append(_fmt(ref and j['ms_per_step'] / ref['ms_per_step'], '.2f'))
    lines.append(f'{name:<31} ' + ' '.join(f'{c:>22}' for c in cells) +
                 f'  {ratios[0]:>9}  {ratios[1]:>10}')
  return '\n'.join(lines)


def main(argv: list[str], mode: str) -> int:
  """Runs the `mode` ('train' | 'eval') benchmark; returns 1 if tensorflow got imported."""
  args = parse(argv, mode)
  ml = ensure_ml_collections()
  pin_threads(args.threads)
  env = dict(environment(args), ml_collections=ml)
  print(f'{mode}: ' + ', '.join(f'{k} {v}' for k, v in env.items()), flush=True)
  rows = run_all(args)
  env['load_avg_end'] = os.getloadavg()[0]
  env['tensorflow_imported'] = 'tensorflow' in sys.modules
  print(table(rows, args) + '\n\n' + side_by_side(rows))
  if args.out:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({'config': config, 'env': env, 'results': rows},
                                   indent=2) + '\n')
  if env['tensorflow_imported']:
    print('error: tensorflow was imported; the benchmark path must run with jax + torch only',
          file=sys.stderr)
    return 1
  return 0
