"""Data parallelism: one step function, two ways to run it on many devices.

`train.py` writes `train_step(state, batch)` and `eval_step(state, batch)` once, for a batch that
is "the whole batch" from the function's point of view. A `Strategy` compiles them:

- `Pmap` (`parallel='pmap'`): `jax.pmap(axis_name='batch')`. Each device runs the step on its
  slice `[b / n_local, ...]` of the host batch; the step averages gradients and metrics with
  `lax.pmean/psum` over `axis_name`, and the model's BatchNorm averages its statistics over the
  same axis (`models.create(..., bn_axis_name='batch')`). State is replicated with a leading
  device axis.
- `Sharded` (`parallel='sharded'`): `jax.jit` over `Mesh(devices, ('data',))`, params replicated
  (`P()`), batch sharded on its first axis (`P('data')`), the state buffers donated. The step sees
  one global array, so means over the batch (loss, BatchNorm statistics) are already global and
  `axis_name` is None: no collective is written by hand. (In a hand-written `shard_map` the
  gradients of replicated params come back already summed; a further `pmean` would not average
  them. Plain jit avoids that trap.)

Both give the same numbers on the same global batch (tests/test_parallel.py). Multi-host: each
process feeds only its rows of the global batch (`data` does the split); `Sharded` assembles
them with `jax.make_array_from_process_local_data`, `Pmap` runs over the local devices while its
collectives span all processes.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
StepFn = Callable[[PyTree, dict], tuple]


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           heartbeat_timeout_s: int = 100) -> None:
  """Calls `jax.distributed.initialize`, with gloo collectives when running on CPU.

  Must run before anything touches a jax device. A no-op for an empty address; 'auto' lets
  jax find the cluster itself (TPU pods, SLURM, ...). A process that sends no heartbeat for
  `heartbeat_timeout_s` seconds (it crashed, or failed and left) makes the coordination
  service end every other process, which may be blocked in a collective it will never finish.
  """
  if not coordinator_address:
    return
  timeouts = {'heartbeat_timeout_seconds': heartbeat_timeout_s}
  if coordinator_address == 'auto':
    jax.distributed.initialize(**timeouts)
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **timeouts)


def _check_rows(x, n: int):
  """The host batch must split evenly over the `n` local devices."""
  if x.shape[0] % n:
    raise ValueError(f'host batch of {x.shape[0]} rows does not split over {n} local devices; '
                     f'use a batch size divisible by {n * jax.process_count()}')
  return x


def _first_replica(x):
  """The value of a replicated array as host numpy (works across hosts).

  Reads the first local shard's buffer directly: indexing (`x[0]`) would launch a device
  program that queues behind the step in flight and so waits for it (measured 400 ms, the
  rest of a step, against 0.3 ms for the buffer).
  """
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


def _first_slice(x):
  """Leading-axis slice 0 of a pmap output `[n_local, ...]` as host numpy, without a program."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_shards[0].data)[0]
  return np.asarray(x)[0]


@dataclasses.dataclass
class Pmap:
  """`jax.pmap` over the local devices; collectives over `axis_name` span every process."""
  devices: list | None = None
  axis_name: str = 'batch'

  def __post_init__(self):
    self.devices = self.devices or jax.local_devices()

  @property
  def num_local_devices(self) -> int:
    return len(self.devices)

  @property
  def _stacked(self) -> NamedSharding:
    """Leading axis split over the local devices, one slice each (what pmap consumes)."""
    return NamedSharding(Mesh(np.asarray(self.devices), ('devices',)), P('devices'))

  def put_state(self, state: PyTree) -> PyTree:
    """Host state -> one copy per local device (leading axis n_local)."""
    n = self.num_local_devices
    return jax.device_put(jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), state),
                          self._stacked)

  def get_state(self, state: PyTree) -> PyTree:
    """Replicated state (or reduced metrics) -> one host copy (numpy leaves)."""
    return jax.tree.map(_first_slice, state)

  def put_batch(self, batch: dict) -> dict:
    """Host batch `[b, ...]` -> `[n_local, b / n_local, ...]`, one slice per local device."""
    n = self.num_local_devices

    def split(x):
      return _check_rows(x, n).reshape(n, -1, *x.shape[1:])

    return jax.device_put(jax.tree.map(split, batch), self._stacked)

  def compile(self, step: StepFn, donate_state: bool = True) -> StepFn:
    return jax.pmap(step, axis_name=self.axis_name,
                    donate_argnums=(0,) if donate_state else ())

  # Metrics were reduced over the axis inside the step: every replica holds the result.
  get_metrics = get_state


@dataclasses.dataclass
class Sharded:
  """`jax.jit` over a 1-D `Mesh(devices, ('data',))`: params replicated, batch sharded."""
  devices: list | None = None
  axis_name: None = None  # no hand-written collectives: the step sees global arrays

  def __post_init__(self):
    self.devices = self.devices or jax.devices()
    self.mesh = Mesh(np.asarray(self.devices), ('data',))
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P('data'))

  @property
  def num_local_devices(self) -> int:
    return len([d for d in self.devices if d.process_index == jax.process_index()])

  def put_state(self, state: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        np.shape(x), self.replicated, lambda idx: np.asarray(x)[idx]), state)

  def get_state(self, state: PyTree) -> PyTree:
    return jax.tree.map(_first_replica, state)

  def put_batch(self, batch: dict) -> dict:
    """Host-local rows -> one global array sharded over 'data' on the first axis.

    One process: one `jax.device_put` of the whole batch (99 us for a batch of 8 against 212
    us array by array, `benchmark.py loop`); many: each process's rows joined into the global
    array (`make_array_from_process_local_data`)."""
    jax.tree.map(lambda x: _check_rows(x, self.num_local_devices), batch)
    if jax.process_count() == 1:
      return jax.device_put(batch, self.data_sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.data_sharding, x),
                        batch)

  def compile(self, step: StepFn, donate_state: bool = True) -> StepFn:
    return jax.jit(step, in_shardings=(self.replicated, self.data_sharding),
                   out_shardings=self.replicated,
                   donate_argnums=(0,) if donate_state else ())

  get_metrics = get_state  # metrics come back replicated, like the state


STRATEGIES = {'pmap': Pmap, 'sharded': Sharded}


def prefetch_to_device(batches: Iterable[dict], strategy, size: int = 2) -> Iterator[dict]:
  """Places host batches on the devices `size` steps ahead (transfers are asynchronous)."""
  queue = collections.deque()
  for batch in batches:
    queue.append(strategy.put_batch(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def make(name: str, devices: list | None = None):
  """Returns the strategy called `name` ('pmap' or 'sharded')."""
  if name not in STRATEGIES:
    raise ValueError(f'unknown parallel mode {name!r}; valid: {", ".join(STRATEGIES)}')
  return STRATEGIES[name](devices=devices)


def reduce_sum(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """`x.sum()` over the (global) batch: adds `psum` over devices under pmap."""
  s = jnp.sum(x)
  return jax.lax.psum(s, axis_name) if axis_name else s


def reduce_max(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """`x.max()` over the (global) batch: adds `pmax` over devices under pmap."""
  m = jnp.max(x)
  return jax.lax.pmax(m, axis_name) if axis_name else m


def reduce_mean(tree: PyTree, axis_name: str | None) -> PyTree:
  """Averages a pytree over devices under pmap; identity under jit (already global)."""
  return jax.lax.pmean(tree, axis_name) if axis_name else tree
