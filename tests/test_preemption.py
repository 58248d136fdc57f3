"""Preemption: damaged checkpoints are skipped with a warning; SIGKILLed runs resume to the bit."""
from __future__ import annotations

import json
import pathlib
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from hubert_ecg_jax.train.checkpointing import CheckpointManager, abstract_like


def _state(step: int) -> dict[str, jax.Array]:
  sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
  tree = {"w": np.full((4, 3), step, np.float32), "step": np.array(step, np.int32)}
  return jax.device_put(tree, sharding)


class _Position:
  """A data position that is just a number, saved as JSON."""

  def __init__(self, index: int = -1):
    self.index = index

  def save(self, path: str) -> None:
    pathlib.Path(path).write_text(json.dumps(self.index))

  def restore(self, path: str) -> None:
    self.index = json.loads(pathlib.Path(path).read_text())


def _damage(directory: pathlib.Path, step: int) -> None:
  """Truncates every array data file of the checkpoint at `step` to half its size."""
  files = [f for f in (directory / str(step) / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  assert files, f"no array files under {directory / str(step)}"
  for file in files:
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def _saved(tmp_path: pathlib.Path, steps: tuple[int, ...]) -> CheckpointManager:
  from hubert_ecg_jax.train.checkpointing import DataPosition

  manager = CheckpointManager(tmp_path / "checkpoints", keep_last=5, keep_best=0)
  for step in steps:
    assert manager.save(step, _state(step), DataPosition(_Position(step * 10)))
  return manager


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path) -> None:
  from hubert_ecg_jax.train.checkpointing import DataPosition

  _saved(tmp_path, (1, 2, 3)).close()
  _damage(tmp_path / "checkpoints", 3)
  manager = CheckpointManager(tmp_path / "checkpoints", keep_last=5, keep_best=0)
  abstract = abstract_like(_state(0), _state(0)["w"].sharding)
  position = _Position()
  with pytest.warns(UserWarning, match=r"checkpoints/3 cannot be read \(.+\); trying step 2 instead"):
    state = manager.restore(abstract, DataPosition(position))
  assert manager.restored_step == 2 and int(state["step"]) == 2 and position.index == 20
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 2, np.float32))
  # The run reaches step 3 again: the damaged checkpoint is replaced, and then reads cleanly.
  assert manager.save(3, _state(3), DataPosition(_Position(30)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = manager.restore(abstract, DataPosition(position))
  assert manager.restored_step == 3 and int(state["step"]) == 3 and position.index == 30
  manager.close()


def test_when_no_checkpoint_can_be_read_the_error_lists_each_failure(tmp_path) -> None:
  _saved(tmp_path, (1, 2)).close()
  for step in (1, 2):
    _damage(tmp_path / "checkpoints", step)
  manager = CheckpointManager(tmp_path / "checkpoints", keep_last=5, keep_best=0)
  abstract = abstract_like(_state(0), _state(0)["w"].sharding)
  with pytest.warns(UserWarning, match="no older checkpoint left"):
    with pytest.raises(RuntimeError, match=r"(?s)no checkpoint in .*checkpoints can be read.*"
                       r"step 2: \w+.*step 1: \w+"):
      manager.restore(abstract)
  with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
    CheckpointManager(tmp_path / "empty").restore(abstract)
  manager.close()
