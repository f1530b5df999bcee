"""The train step: a pure function of (state, batch), the same for every parallel mode.

One call is one microbatch. With `train.accum_steps = N > 1` the optimizer is
`optax.MultiSteps(tx, N)` (train.py wraps it): N calls add up their gradients in the optimizer
state and the N-th applies their mean, so a checkpoint between two microbatches resumes
exactly; BatchNorm normalises each microbatch with its own statistics and updates the
running ones at every microbatch (torch's accumulation recipe). With `train.ema_decay > 0`
the state holds an EMA of params and BatchNorm statistics (`ema.py`, timm ModelEmaV3),
updated after each optimizer update. With `train.mixup` / `train.cutmix` the batch is mixed
in the step (`mixing.py`, timm's Mixup) and the loss reads the soft targets.

`parallel.py` compiles it with pmap (then `axis_name='batch'` and the step averages gradients
and adds up metrics over devices) or with jit over a mesh (then `axis_name=None`: the batch is one
global array and every mean is already global). The eval step is `evaluators.make_eval_step`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flowers_jax import ema as ema_lib
from flowers_jax import losses, mixing, normalization
from flowers_jax.parallel import reduce_max, reduce_mean, reduce_sum

PyTree = Any
MIX_STREAM = 1  # fold_in of the step key that draws mixup / cutmix (dropout uses the key)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; checkpointed as is)."""
  step: jnp.ndarray  # int32 []
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jnp.ndarray  # uint32 [2], raw PRNG key data (checkpoint friendly)
  ema: PyTree = flax.struct.field(default_factory=dict)  # {'params', 'batch_stats'} or {}

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation, seed: int,
             ema: bool = False) -> 'TrainState':
    """`step` counts calls of the train step (microbatches); `ema`: keep an EMA copy."""
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)),
               ema={'params': copy(params), 'batch_stats': copy(batch_stats)} if ema else {})

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def ema_view(self) -> 'TrainState':
    """This state with the EMA weights in place of the raw ones (for evaluation)."""
    return self.replace(params=self.ema['params'], batch_stats=self.ema['batch_stats'])


def accumulating(tx: optax.GradientTransformation, accum_steps: int, params: PyTree
                 ) -> optax.GradientTransformation:
  """`tx`, or for `accum_steps > 1` `optax.MultiSteps(tx, accum_steps)`: the mean of that many
  calls' gradients is applied on the last of them, accumulated in the params' dtype (optax's
  default, float32, would drop a float64 run's precision)."""
  if accum_steps == 1:
    return tx
  dtype = jnp.result_type(*jax.tree.leaves(params))
  return optax.MultiSteps(tx, every_k_schedule=accum_steps, accumulator_dtype=dtype)


def _step_rng(state: TrainState) -> jax.Array:
  """A fresh key per step, a pure function of (seed, step), the same on every device.

  Models draw their dropout / stochastic-depth masks for the global batch from it and keep
  their own rows (`models/layers/dropout.py`), so the numbers do not depend on the device count.
  """
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _global_norm(tree: PyTree) -> jnp.ndarray:
  """sqrt of the sum of squares of every leaf, in float32 (inf when it overflows)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree: PyTree) -> jnp.ndarray:
  """Scalar bool: every element of every leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _forward(model: nn.Module, variables: dict, images: jnp.ndarray, *, train: bool,
             bn_train: bool, rng: jax.Array | None):
  """Runs the model: (logits [B, C], pre_logits [B, D], new batch_stats or None)."""
  kwargs = dict(train=train, bn_train=bn_train)
  if rng is not None:
    kwargs['rngs'] = {'dropout': rng}
  if bn_train and variables.get('batch_stats'):
    (logits, out), updates = model.apply(variables, images, mutable=['batch_stats'], **kwargs)
    return logits, out['pre_logits'], updates['batch_stats']
  logits, out = model.apply(variables, images, **kwargs)
  return logits, out['pre_logits'], None


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    train_cfg: ml_collections.ConfigDict, *, axis_name: str | None,
                    bn_train: bool = True, mean: Sequence[float] = normalization.IMAGENET_MEAN,
                    std: Sequence[float] = normalization.IMAGENET_STD):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  batch: `image [B, H, W, 3]`, `label [B]`, `mask [B]`, optionally `stop [B]` (the host's
  stop-signal number, 0 for none); losses with `extra_inputs` (`losses.LOSSES`)
  also read `positive`/`negative [B, H, W, 3]`, which go through the model in the same
  forward pass as the anchors. uint8 images are normalised first with `mean` / `std`
  (`normalization.normalize`: the data set's `data.mean` / `data.std`); float ones are taken
  as normalised.
  bn_train: BatchNorm on batch statistics, updating the running ones (torch `train()`), or on
    the running statistics, kept as they are (torch `eval()`); see `train.batchnorm_mode`.

  metrics: `loss`, `correct`, `count` and the loss's parts, plus two that every process reads
  to take the same decision at the same step: `finite` (1 if the new params, BatchNorm
  statistics and loss are all finite and the update's global norm does not overflow float32,
  i.e. is below ~1.8e19: no sane step moves that far) and `stop` (the largest stop-signal
  number of any host's rows: a signal to one host stops them all at the same step).
  """
  loss_name = train_cfg.loss
  extra_inputs = losses.get(loss_name).extra_inputs
  accum = int(train_cfg.accum_steps)
  ema_decay = float(train_cfg.ema_decay)
  mixes = train_cfg.mixup > 0 or train_cfg.cutmix > 0

  def mixed(batch, rng):
    """The batch with mixed images and `soft_target` [B, C] (timm's Mixup, batch mode)."""
    num_classes = model.num_classes
    images, targets = mixing.mix_batch(
        jax.random.fold_in(rng, MIX_STREAM), batch['image'], batch['label'], num_classes,
        mixup_alpha=float(train_cfg.mixup), cutmix_alpha=float(train_cfg.cutmix),
        switch_prob=float(train_cfg.mix_switch_prob),
        label_smoothing=float(train_cfg.label_smoothing), axis_name=axis_name)
    return {**batch, 'image': images, 'soft_target': targets}

  def ema_update(state, params, batch_stats):
    """The EMA after this call: updated when the optimizer updated (every `accum` calls)."""
    if not state.ema:
      return state.ema
    updates = (state.step + 1) // accum  # optimizer updates done after this call
    decay = ema_lib.decay_at(updates, decay=ema_decay)
    new = ema_lib.update(state.ema, {'params': params, 'batch_stats': batch_stats}, decay)
    applied = (state.step + 1) % accum == 0
    return jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, state.ema)

  def loss_fn(params, state, batch, rng):
    images = jnp.concatenate([batch['image']] + [batch[k] for k in extra_inputs], axis=0)
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, emb, new_stats = _forward(model, variables, images, train=True, bn_train=bn_train,
                                      rng=rng)
    parts_logits = jnp.split(logits, 1 + len(extra_inputs))
    parts_emb = jnp.split(emb, 1 + len(extra_inputs))
    outputs = {'logits': parts_logits[0], 'embedding': parts_emb[0]}
    for name, e in zip(extra_inputs, parts_emb[1:]):
      outputs[f'{name}_embedding'] = e
    loss, aux = losses.compute(loss_name, train_cfg, outputs, batch, axis_name=axis_name)
    return loss, (aux, new_stats, parts_logits[0])

  def train_step(state: TrainState, batch: dict):
    rng = _step_rng(state)
    batch = normalization.normalize_batch(batch, mean, std)
    if mixes:
      batch = mixed(batch, rng)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (aux, new_stats, logits)), grads = grad_fn(state.params, state, batch, rng)
    grads = reduce_mean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = state.batch_stats if new_stats is None else new_stats
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema=ema_update(state, params, batch_stats))
    mask = batch['mask']
    metrics = {
        'loss': reduce_mean(loss, axis_name),
        'correct': reduce_sum(mask * (jnp.argmax(logits, -1) == batch['label']), axis_name),
        'count': reduce_sum(mask, axis_name),
        **{k: reduce_mean(v, axis_name) for k, v in aux.items()},
        'finite': (all_finite((params, batch_stats, loss)) &
                   jnp.isfinite(_global_norm(updates))).astype(jnp.float32),
        'stop': reduce_max(batch['stop'], axis_name) if 'stop' in batch else jnp.zeros(()),
    }
    if axis_name:  # params are identical on every device; the loss is per device
      metrics['finite'] = jax.lax.pmin(metrics['finite'], axis_name)
    return new_state, metrics

  return train_step
