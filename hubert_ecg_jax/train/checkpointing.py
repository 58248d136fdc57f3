"""Training checkpoints with Orbax (v1 `training.Checkpointer`): state + data position, atomic.

More in docs/modules.md."""
from __future__ import annotations

import asyncio
import os
import pathlib
import uuid
import warnings
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding
from orbax.checkpoint import v1 as ocp

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data.pipeline import DataPositionMismatch
from hubert_ecg_jax.files import (AnyPath, UrlPath, as_path, atomic_path, commit_by_copy, move,
                                  orbax_native, orbax_path, remove_tree, write_text_atomic)
from hubert_ecg_jax.model_dir import PARAMS_DIR, save_model, write_config_and_metadata
from hubert_ecg_jax.parallel import host_copy

STATE = "state"
DATA = "data"
BEST_METRIC = "val_loss"
PAUSE_SAVE_ENV = "HUBERT_ECG_JAX_TEST_PAUSE_SAVE"  # tests only: see `_pause_for_tests`
MIRRORS_ENV = "HUBERT_ECG_JAX_CHECKPOINT_MIRRORS"  # where `mirror_folder` puts local mirrors
COMMITTED = "_COMMITTED"  # a step's commit marker at a mirrored URL (see `UrlMirror`)


async def _pause_for_tests(step: int | None, checkpoint: AnyPath) -> None:
  """Test hook, off unless HUBERT_ECG_JAX_TEST_PAUSE_SAVE=STEP:MARKER is set: the save of STEP writes
  the path of `checkpoint` (its temporary directory) to the file MARKER, then waits until MARKER is
  deleted, before the staged data position moves in and Orbax commits the directory. Tests kill or
  signal the process there, at a known point, instead of racing the save. Needs a data position."""
  setting = os.environ.get(PAUSE_SAVE_ENV)
  if not setting:
    return
  at, _, marker = setting.partition(":")
  if not (at.isdigit() and marker):
    raise ValueError(f"{PAUSE_SAVE_ENV} must be STEP:MARKER_PATH, found {setting!r}")
  if step != int(at):
    return
  write_text_atomic(marker, str(checkpoint))
  while os.path.exists(marker):
    await asyncio.sleep(0.01)


class DataPosition:
  """The input iterator's position, saved and restored with a checkpoint.

  Wraps an object with `save(path)` / `restore(path)` methods; `path` is a file prefix (what
  `tf.train.Checkpoint(iterator=it).write/read` take). Each process saves its own position.
  Implements Orbax's `StatefulCheckpointable`.
  """

  def __init__(self, source: Any):
    if not (callable(getattr(source, "save", None)) and callable(getattr(source, "restore", None))):
      raise ValueError("the data position must be an object with save(path) and restore(path) "
                       f"methods, found {type(source).__name__}")
    self._save, self._restore = source.save, source.restore
    self.step: int | None = None  # the step being saved, set by `CheckpointManager.save`
    # The source refused the saved position as another pipeline's (Orbax hides why a load failed).
    self.mismatch: DataPositionMismatch | None = None
    self.staging: AnyPath | None = None  # where to capture the position, set by the manager too

  @staticmethod
  def _name() -> str:
    return f"process_{jax.process_index()}"

  async def save(self, directory: Any) -> Any:
    # Capture the position now (the iterator moves on once this returns), write it out later, from
    # a hidden folder with a fixed name in the checkpoints directory: a kill leaves it to the next
    # save to replace, not to the temporary folder of the machine.
    if self.staging is None:
      raise ValueError("the data position is saved by CheckpointManager.save, which sets its staging")
    staging = self.staging / f".data-position-{self._name()}"
    remove_tree(staging)
    staging.mkdir(parents=True)
    try:
      self._save(str(staging / "position"))
    except BaseException:
      remove_tree(staging)
      raise

    async def finish() -> None:
      try:
        target = as_path(str(await directory.await_creation())) / self._name()
        await _pause_for_tests(self.step, target.parent.parent)
        move(staging, target)
      finally:
        remove_tree(staging)  # gone already when the move succeeded

    return finish()

  async def load(self, directory: Any) -> Any:
    path = as_path(str(directory)) / self._name() / "position"

    async def finish() -> None:
      if not path.parent.is_dir():
        raise FileNotFoundError(f"no data position for process {jax.process_index()} in "
                                f"{directory}: was the run saved with fewer processes?")
      try:
        self._restore(str(path))
      except DataPositionMismatch as error:
        self.mismatch = error
        raise

    return finish()


def abstract_like(tree: Any, sharding: Sharding) -> Any:
  """Shape/dtype skeleton of `tree` with every array placed by `sharding` (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def mirror_folder(url: UrlPath) -> pathlib.Path:
  """The local folder that mirrors the checkpoints at `url`: `<root>/<scheme>/<bucket/key>`, the
  root being $HUBERT_ECG_JAX_CHECKPOINT_MIRRORS, else $XDG_CACHE_HOME (or ~/.cache)/hubert_ecg_jax/
  checkpoint-mirrors."""
  root = os.environ.get(MIRRORS_ENV) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hubert_ecg_jax",
      "checkpoint-mirrors")
  return pathlib.Path(root, url.scheme, url.key).absolute()


def _marker(step_folder: AnyPath) -> str | None:
  marker = step_folder / COMMITTED
  return marker.read_text() if marker.is_file() else None


def _step_folders(root: AnyPath) -> dict[int, AnyPath]:
  return {int(p.name): p for p in root.iterdir() if p.name.isdigit()} if root.is_dir() else {}


class UrlMirror:
  """Checkpoints at a URL Orbax cannot write (every scheme but gs://): Orbax works in a local
  folder, and each saved step is copied to `<url>/<step>/` with a marker object `_COMMITTED` (a
  random token) written last. A step at the URL without its marker is what a kill during the copy
  left: it is never read, and the next save of that step replaces it."""

  def __init__(self, url: UrlPath, local: pathlib.Path):
    self.url, self.local = url, local

  def pull(self) -> None:
    """Makes the local folder hold the committed steps of the URL, and no other step."""
    committed = {step: _marker(folder) for step, folder in _step_folders(self.url).items()}
    committed = {step: token for step, token in committed.items() if token is not None}
    for step, folder in _step_folders(self.local).items():
      if step not in committed or committed[step] != _marker(folder):
        remove_tree(folder)
    for step in committed.keys() - _step_folders(self.local).keys():
      with atomic_path(self.local / str(step), folder=True) as staging:  # a local rename: atomic
        commit_by_copy(self.url / str(step), staging)

  def push(self, step: int, kept: list[int]) -> None:
    """Copies the local `step` to the URL and commits it there; then removes the URL's steps that
    are not `kept`, each marker first (a removal cut short leaves an uncommitted step)."""
    token = uuid.uuid4().hex
    commit_by_copy(self.local / str(step), self.url / str(step))
    (self.url / str(step) / COMMITTED).write_text(token)
    (self.local / str(step) / COMMITTED).write_text(token)
    for other, folder in _step_folders(self.url).items():
      if other not in kept:
        (folder / COMMITTED).unlink(missing_ok=True)
        remove_tree(folder)


class CheckpointManager:
  """Periodic checkpoints of a training run under `directory`, keep-last-N plus best-by-val-loss.

  At a URL Orbax cannot write (`files.orbax_native`), Orbax works in the local folder `mirror`
  (default: `mirror_folder(directory)`), synced from the URL on start and copied to it after each
  save (`UrlMirror`); one process only.
  """

  def __init__(self, directory: str | os.PathLike | AnyPath, keep_last: int = 3, keep_best: int = 1,
               mirror: str | os.PathLike | None = None):
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1 (the latest checkpoint is needed to resume), "
                       f"got {keep_last}")
    if keep_best < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    policies = ocp.training.preservation_policies
    keep = [policies.LatestN(keep_last)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], reverse=True,
                                 n=keep_best, keep_checkpoints_without_metrics=False))
    self.directory = as_path(directory).absolute()
    self.restored_step: int | None = None  # the step the last `restore` read
    self._unreadable: set[int] = set()  # steps a restore could not read: saving them rewrites them
    self._mirror: UrlMirror | None = None
    self._local = self.directory  # the folder Orbax works in
    if not orbax_native(self.directory):
      if jax.process_count() > 1:
        raise ValueError(f"checkpoints at {self.directory} go through a local mirror folder, which "
                         f"serves one process, found {jax.process_count()} processes: give a "
                         "multi-host run a gs:// URL or a shared file system")
      self._local = pathlib.Path(mirror).absolute() if mirror else mirror_folder(self.directory)
      self._mirror = UrlMirror(self.directory, self._local)
      self._mirror.pull()
    self._checkpointer = ocp.training.Checkpointer(
        orbax_path(self._local), preservation_policy=policies.AnyPreservationPolicy(keep))

  @property
  def steps(self) -> list[int]:
    """Steps of the checkpoints on disk, ascending."""
    return [checkpoint.step for checkpoint in self._checkpointer.checkpoints]

  @property
  def latest_step(self) -> int | None:
    latest = self._checkpointer.latest
    return None if latest is None else latest.step

  @property
  def best_step(self) -> int | None:
    """The kept checkpoint with the lowest validation loss, if any was saved with one."""
    scored = [(c.metrics[BEST_METRIC], c.step) for c in self._checkpointer.checkpoints
              if c.metrics and BEST_METRIC in c.metrics]
    return min(scored)[1] if scored else None

  def has_data_position(self, step: int) -> bool:
    """Whether the checkpoint at `step` holds a data position."""
    return (self._local / str(step) / DATA).is_dir()

  def _data_position_matches(self, step: int) -> bool:
    """Whether the data position at `step` was saved by as many processes as this run has.

    Each process saves its own iterator state (its share of the global batch); another process
    count cannot continue them. The state is still restored and the data stream restarts.
    """
    saved = len(list((self._local / str(step) / DATA).glob("process_*")))
    if saved == jax.process_count():
      return True
    warnings.warn(f"the data position in checkpoint {step} was saved by {saved} process(es) and "
                  f"this run has {jax.process_count()}: parameters, optimizer state and step are "
                  "restored, but the data stream restarts from its seed instead of continuing",
                  stacklevel=3)
    return False

  def save(self, step: int, state: Any, data_position: DataPosition | None = None,
           val_loss: float | None = None) -> bool:
    """Saves `state` (replicated arrays) and the data position at `step`; False if already saved."""
    if step in self._unreadable:
      self._checkpointer.delete(step)
      self._unreadable.discard(step)
    if step in self.steps:
      return False
    items = {STATE: state}
    if data_position is not None:
      data_position.step, data_position.staging = step, self._local
      items[DATA] = data_position
    metrics = None if val_loss is None else {BEST_METRIC: float(val_loss)}
    saved = self._checkpointer.save_checkpointables(step, items, metrics=metrics, force=True)
    if saved and self._mirror is not None:
      self._mirror.push(step, self.steps)
    return saved

  def restore(self, abstract_state: Any, data_position: DataPosition | None = None,
              step: int | None = None) -> Any:
    """The state at `step` placed as `abstract_state` says; the data position is restored into
    `data_position` when given and the checkpoint holds one.

    Without `step`: the latest checkpoint that can be read. One that fails to read is skipped with
    a warning naming it and the error (and rewritten when the run saves that step again); if none
    can be read, a RuntimeError lists every failure. `restored_step` tells which step was read.
    """
    candidates = [step] if step is not None else sorted(self.steps, reverse=True)
    if not candidates:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    failures = []
    for candidate in candidates:
      items = {STATE: abstract_state}
      if (data_position is not None and self.has_data_position(candidate)
          and self._data_position_matches(candidate)):
        items[DATA] = data_position
      try:
        restored = self._checkpointer.load_checkpointables(candidate, items)
      except Exception as error:
        if DATA in items and data_position.mismatch is not None:
          raise data_position.mismatch from None  # not damage: older checkpoints hold the same kind
        if step is not None:
          raise
        failures.append(f"step {candidate}: {type(error).__name__}: {error}")
        self._unreadable.add(candidate)
        older = [s for s in candidates if s < candidate]
        warnings.warn(f"checkpoint {self.directory / str(candidate)} cannot be read "
                      f"({type(error).__name__}: {error}); "
                      + (f"trying step {older[0]} instead" if older else "no older checkpoint left"),
                      stacklevel=2)
        continue
      self.restored_step = candidate
      return restored[STATE]
    raise RuntimeError(f"no checkpoint in {self.directory} can be read (damaged or of another "
                       "model?):\n  " + "\n  ".join(failures))

  def close(self) -> None:
    self._checkpointer.close()


def export_model(directory: str | os.PathLike | AnyPath, config: HubertECGConfig, params: Any,
                 metadata: dict[str, Any] | None = None) -> AnyPath | None:
  """Writes the params as a finished model (the format of `model_dir.save_model`) for fine-tuning.

  Every process must call it. On one process this is `save_model`; on several, all take part in
  the Orbax save of the params (Orbax synchronises them) and process 0 writes the config and
  moves the complete directory into place. Returns the directory on process 0, None elsewhere.
  """
  host_params = host_copy(params)
  if jax.process_count() == 1:
    return save_model(directory, config, host_params, metadata=metadata, overwrite=True)
  directory = as_path(directory).absolute()
  staging = directory.parent / f".{directory.name}.export"  # the same path on every process
  primary = jax.process_index() == 0
  if primary:
    remove_tree(staging)
    staging.mkdir(parents=True)
  multihost_utils.sync_global_devices("export_model:staging")
  ocp.save_pytree(orbax_path(staging / PARAMS_DIR), host_params)
  if primary:
    write_config_and_metadata(staging, config, metadata)
    remove_tree(directory)
    move(staging, directory)
  multihost_utils.sync_global_devices("export_model:done")
  return directory if primary else None
