"""Two ways to run the per-device step data-parallel: `jax.pmap`, or `jax.jit(jax.shard_map(...))`.

Both run the same per-device functions of `step.py` over a one-axis device mesh named `"data"`:
the state is replicated on every device and the batch is split along its first axis. Batches are
placed with `jax.make_array_from_process_local_data`, so each process passes only its own rows and
the same code runs on one host or many. One device is the mesh launcher on a 1-device mesh.

Checkpoints see one layout whatever the launcher: `checkpoint_view` gives the state as arrays
replicated over the mesh (`NamedSharding(mesh, P())`), and `place_state` takes such a state (or
host arrays) back into the launcher's layout.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hubert_ecg_jax.train.step import AXIS

LAUNCHERS = ("mesh", "pmap")


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis `("data",)` mesh over `devices` (default: all devices of all processes).

  The axis type is Auto (not `jax.make_mesh`'s default Explicit): the mesh `jax.pmap` builds
  itself, so arrays of both launchers share shardings and checkpoints.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (AXIS,))


def _replicated(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x` (host array, local or global jax.Array) as a new array replicated under `sharding`.

  Always a copy: the train step donates the state, which must not delete the caller's arrays.
  """
  if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
    return jax.device_put(x.copy(), sharding)  # device_put alone may reuse x's buffers
  # A host value (the same on every process): each process places its copies.
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


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


class MeshLauncher(_DataParallel):
  """`jax.jit(jax.shard_map(step))` over a `("data",)` mesh, the state donated."""

  kind = "mesh"

  def __init__(self, train_step: Callable, eval_step: Callable,
               devices: Sequence[jax.Device] | None = None):
    self.mesh = data_mesh(devices)
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    # check_vma=False: the step sums its gradients over AXIS itself (psum, the same code runs under
    # pmap); with varying-axis checking JAX would also sum the replicated params' cotangents.
    self._train = jax.jit(
        jax.shard_map(train_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                      check_vma=False),
        donate_argnums=0)
    self._eval = jax.jit(
        jax.shard_map(eval_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                      check_vma=False))

  def place_state(self, state: Any) -> Any:
    return jax.tree.map(lambda x: _replicated(x, self.state_sharding), state)

  def checkpoint_view(self, state: Any) -> Any:
    return state

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    self._check_local_batch(batch)
    return {name: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(value))
            for name, value in batch.items()}

  def train_step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
    return self._train(state, batch)

  def eval_step(self, state: Any, batch: dict[str, jax.Array]) -> Any:
    return self._eval(state.params, batch)

  def to_host(self, tree: Any) -> Any:
    """Replicated outputs (metrics) as numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class PmapLauncher(_DataParallel):
  """`jax.pmap(step, axis_name="data", donate_argnums=0)`: state and batch carry a device axis."""

  kind = "pmap"

  def __init__(self, train_step: Callable, eval_step: Callable,
               devices: Sequence[jax.Device] | None = None):
    self.mesh = data_mesh(devices)
    self.stacked_sharding = NamedSharding(self.mesh, P(AXIS))  # the layout pmap uses
    devices = list(self.mesh.devices.flat)
    self._train = jax.pmap(train_step, axis_name=AXIS, donate_argnums=0, devices=devices)
    self._eval = jax.pmap(eval_step, axis_name=AXIS, devices=devices)

  def place_state(self, state: Any) -> Any:
    """Replicated state -> (devices, ...) arrays, one copy per device, no host round trip."""

    def stack(x: Any) -> jax.Array:
      replicated = _replicated(x, self.state_sharding)
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

  def train_step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
    return self._train(state, batch)

  def eval_step(self, state: Any, batch: dict[str, jax.Array]) -> Any:
    return self._eval(state.params, batch)

  def to_host(self, tree: Any) -> Any:
    """Per-device outputs that are equal on every device (metrics) as numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


Launcher = MeshLauncher | PmapLauncher


def make_launcher(kind: str, train_step: Callable, eval_step: Callable,
                  devices: Sequence[jax.Device] | None = None) -> Launcher:
  """`"mesh"` (jit + shard_map, the default) or `"pmap"` over `devices` (default: all)."""
  if kind == "mesh":
    return MeshLauncher(train_step, eval_step, devices)
  if kind == "pmap":
    return PmapLauncher(train_step, eval_step, devices)
  raise ValueError(f"unknown launcher {kind!r}: expected one of {LAUNCHERS}")
