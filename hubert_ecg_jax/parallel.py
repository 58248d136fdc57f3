"""The device layer: the `("data",)` mesh, placing state and batches, host copies, and launchers.

More in docs/modules.md."""
from __future__ import annotations

import collections
import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any, Callable, Generic, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hubert_ecg_jax.run_lock import DirectoryHeldError, hold_directory

AXIS = "data"
LAUNCHERS = ("mesh", "pmap")
Placed = TypeVar("Placed")


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis `("data",)` mesh over `devices` (default: all devices of all processes).

  The axis type is Auto (not `jax.make_mesh`'s default Explicit): the mesh `jax.pmap` builds
  itself, so arrays of both launchers share shardings and checkpoints.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (AXIS,))


def host_copy(tree: Any) -> Any:
  """Replicated arrays as numpy, from this process's first copy (works on every host)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def replicate(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x` (host array, local or global jax.Array) as a new array replicated under `sharding`.

  Always a copy: the train step donates the state, which must not delete the caller's arrays.
  """
  if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
    return jax.device_put(x.copy(), sharding)  # device_put alone may reuse x's buffers
  # A host value (the same on every process): each process places its copies.
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


@contextlib.contextmanager
def hold_run_directory(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds `workdir` for this job (`run_lock`): process 0 for all the processes of a multi-host
  job, and every process refuses when it could not, so that none waits for the others."""
  with contextlib.ExitStack() as stack:
    refusal = None
    try:
      stack.enter_context(hold_directory(workdir, take=jax.process_index() == 0))
    except DirectoryHeldError as error:
      refusal = error
    if jax.process_count() > 1:
      held = bool(multihost_utils.broadcast_one_to_all(np.array(refusal is not None)))
      if held and refusal is None:
        refusal = DirectoryHeldError(f"{workdir} is in use by another job (process 0 could not "
                                     "hold it; its error says by which)")
    if refusal is not None:
      raise refusal
    yield


class DevicePrefetch(Generic[Placed]):
  """Host items placed on the devices ahead of the step that takes them (double buffering).

  `place(item)` starts the host-to-device copies (`jax.device_put` and
  `make_array_from_process_local_data` return before the copies finish), so a `fill` right after a
  step is dispatched overlaps the next batches' transfers with that step. `ahead` 0: each item is
  pulled and placed only when `next` asks for it. Items leave the iterator when placed, not when
  taken: `pending` says how many were pulled but not yet taken.
  """

  def __init__(self, items: Iterator[Any], place: Callable[[Any], Placed], ahead: int):
    if ahead < 0:
      raise ValueError(f"the number of batches placed ahead must be >= 0, found {ahead}")
    self._items, self._place, self.ahead = items, place, ahead
    self._queue: collections.deque[Placed] = collections.deque()
    self._exhausted = False

  @property
  def pending(self) -> int:
    return len(self._queue)

  def fill(self, room: int) -> None:
    """Places items until `min(ahead, room)` wait; `room` bounds how far the iterator may run ahead
    (e.g. not past the next checkpoint, whose data position must be that of the steps taken)."""
    while not self._exhausted and len(self._queue) < min(self.ahead, room):
      try:
        item = next(self._items)
      except StopIteration:
        self._exhausted = True  # raised again by `next` once the placed items are taken
        return
      self._queue.append(self._place(item))

  def __next__(self) -> Placed:
    if self._queue:
      return self._queue.popleft()
    if self._exhausted:
      raise StopIteration
    return self._place(next(self._items))


class _DataParallel:
  """What both launchers share: the mesh, the replicated sharding, batch checks."""

  kind: str
  mesh: Mesh

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def local_devices(self) -> int:
    return len(self.mesh.local_devices)

  @property
  def state_sharding(self) -> NamedSharding:
    """The sharding of `checkpoint_view` arrays: replicated over the mesh."""
    return NamedSharding(self.mesh, P())

  def _check_local_batch(self, batch: dict[str, np.ndarray]) -> int:
    sizes = {name: np.shape(value)[0] for name, value in batch.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"batch arrays disagree on the batch size: {sizes}")
    size = next(iter(sizes.values()))
    if size % self.local_devices:
      raise ValueError(f"the process-local batch of {size} does not split over this process's "
                       f"{self.local_devices} devices: use a multiple of {self.local_devices}")
    return size

  def train_step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
    return self._train(state, batch)

  def eval_step(self, state: Any, batch: dict[str, jax.Array]) -> Any:
    return self._eval(state.params, batch)


class MeshLauncher(_DataParallel):
  """`jax.jit(jax.shard_map(step))` over a `("data",)` mesh, the state donated."""

  kind = "mesh"

  def __init__(self, train_step: Callable, eval_step: Callable | None = None,
               devices: Sequence[jax.Device] | None = None):
    self.mesh = data_mesh(devices)
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    # check_vma=False: the step sums its gradients over AXIS itself (psum, the same code runs under
    # pmap); with varying-axis checking JAX would also sum the replicated params' cotangents.
    self._train = jax.jit(
        jax.shard_map(train_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                      check_vma=False),
        donate_argnums=0)
    self._eval = eval_step and jax.jit(
        jax.shard_map(eval_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                      check_vma=False))

  def place_state(self, state: Any) -> Any:
    return jax.tree.map(lambda x: replicate(x, self.state_sharding), state)

  def checkpoint_view(self, state: Any) -> Any:
    return state

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    self._check_local_batch(batch)
    return {name: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(value))
            for name, value in batch.items()}

  def to_host(self, tree: Any) -> Any:
    """Replicated outputs (metrics) as numpy arrays."""
    return host_copy(tree)


class PmapLauncher(_DataParallel):
  """`jax.pmap(step, axis_name="data", donate_argnums=0)`: state and batch carry a device axis."""

  kind = "pmap"

  def __init__(self, train_step: Callable, eval_step: Callable | None = None,
               devices: Sequence[jax.Device] | None = None):
    self.mesh = data_mesh(devices)
    self.stacked_sharding = NamedSharding(self.mesh, P(AXIS))  # the layout pmap uses
    devices = list(self.mesh.devices.flat)
    self._train = jax.pmap(train_step, axis_name=AXIS, donate_argnums=0, devices=devices)
    self._eval = eval_step and jax.pmap(eval_step, axis_name=AXIS, devices=devices)

  def place_state(self, state: Any) -> Any:
    """Replicated state -> (devices, ...) arrays, one copy per device, no host round trip."""

    def stack(x: Any) -> jax.Array:
      replicated = replicate(x, self.state_sharding)
      copies = [shard.data[None] for shard in replicated.addressable_shards]  # each (1, ...)
      return jax.make_array_from_single_device_arrays(
          (self.num_devices, *replicated.shape), self.stacked_sharding, copies)

    return jax.tree.map(stack, state)

  def checkpoint_view(self, state: Any) -> Any:
    """(devices, ...) arrays -> arrays replicated over the mesh (device 0's copy is each device's)."""

    def unstack(x: jax.Array) -> jax.Array:
      copies = [shard.data[0] for shard in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], self.state_sharding, copies)

    return jax.tree.map(unstack, state)

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    size = self._check_local_batch(batch)
    per_device = size // self.local_devices
    return {name: jax.make_array_from_process_local_data(
                self.stacked_sharding,
                np.asarray(value).reshape(self.local_devices, per_device, *np.shape(value)[1:]))
            for name, value in batch.items()}

  def to_host(self, tree: Any) -> Any:
    """Per-device outputs that are equal on every device (metrics) as numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


Launcher = MeshLauncher | PmapLauncher


def make_launcher(kind: str, train_step: Callable, eval_step: Callable | None = None,
                  devices: Sequence[jax.Device] | None = None) -> Launcher:
  """`"mesh"` (jit + shard_map, the default) or `"pmap"` over `devices` (default: all)."""
  if kind == "mesh":
    return MeshLauncher(train_step, eval_step, devices)
  if kind == "pmap":
    return PmapLauncher(train_step, eval_step, devices)
  raise ValueError(f"unknown launcher {kind!r}: expected one of {LAUNCHERS}")


class BatchRunner:
  """Runs `fn(params, x, mask)` over any number of inputs in fixed-size batches on local devices."""

  def __init__(self, fn: Callable, batch_size: int = 64, devices: Sequence[jax.Device] | None = None):
    self.mesh = data_mesh(devices or jax.local_devices())
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, found {batch_size}")
    self.batch_size = math.ceil(batch_size / self.mesh.size) * self.mesh.size
    self._batch_sharding = NamedSharding(self.mesh, P(AXIS))
    self._replicated = NamedSharding(self.mesh, P())
    self._fn = jax.jit(fn)
    self._params: Any = None
    self._placed: Any = None

  def place_params(self, params: Any) -> Any:
    """Params replicated on the runner's devices (cached for the same params object)."""
    if params is not self._params:
      self._params, self._placed = params, jax.device_put(params, self._replicated)
    return self._placed

  def __call__(self, params: Any, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x, mask (n, samples) -> outputs (n, ...) as numpy."""
    placed = self.place_params(params)
    outputs = []
    for start in range(0, len(x), self.batch_size):
      chunk_x, chunk_mask = x[start:start + self.batch_size], mask[start:start + self.batch_size]
      pad = self.batch_size - len(chunk_x)
      if pad:
        chunk_x = np.concatenate([chunk_x, np.zeros((pad, *chunk_x.shape[1:]), chunk_x.dtype)])
        chunk_mask = np.concatenate([chunk_mask, np.ones((pad, *chunk_mask.shape[1:]), chunk_mask.dtype)])
      batch = jax.device_put((jnp.asarray(chunk_x, jnp.float32), jnp.asarray(chunk_mask, jnp.int32)),
                             self._batch_sharding)
      out = np.asarray(self._fn(placed, *batch))
      outputs.append(out[:len(out) - pad])
    return np.concatenate(outputs) if outputs else np.zeros((0,))
