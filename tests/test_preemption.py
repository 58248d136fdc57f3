"""Preemption: damaged checkpoints are skipped with a warning; a `pretrain` run stopped by SIGTERM,
SIGINT or SIGKILL at known points resumes to the bit."""
from __future__ import annotations

import json
import pathlib
import re
import signal
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from hubert_ecg_jax.train.checkpointing import PAUSE_SAVE_ENV, CheckpointManager, abstract_like

from conftest import CliRun, cli_env, pretrain_data, timeout_s, write_tiny_records


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
  with pytest.warns(UserWarning) as caught:
    with pytest.raises(RuntimeError, match=r"(?s)no checkpoint in .*checkpoints can be read.*"
                       r"step 2: \w+.*step 1: \w+"):
      manager.restore(abstract)
  # Ours only: Orbax may add a RuntimeWarning (a coroutine of the failed read never awaited).
  messages = [str(warning.message) for warning in caught if "cannot be read" in str(warning.message)]
  assert len(messages) == 2 and "trying step 1 instead" in messages[0]
  assert "no older checkpoint left" in messages[1]
  with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
    CheckpointManager(tmp_path / "empty").restore(abstract)
  manager.close()


# -- Stopped and killed pretrain runs ------------------------------------------------------------
STEPS = 24
CHECKPOINT_EVERY = 2
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes `<step>.orbax-checkpoint-tmp`, then renames it
# How each run of the command ends, in turn; the next run finishes. In a save: while the save of a
# checkpoint step holds (HUBERT_ECG_JAX_TEST_PAUSE_SAVE), before Orbax commits it. After a step:
# SIGKILL a seeded 0-0.3 s after a step's metrics line, wherever the run is then.
STOPS = ("SIGTERM in the save of step", "SIGKILL in the save of step", "SIGINT in the save of step",
         "SIGKILL after step", "SIGKILL in the save of step", "SIGKILL after step")
RUN_S = 300  # hang guard of the uninterrupted run; the others get 3x its measured time


def _args(tmp_path: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  return ["pretrain", "demo_pretrain", str(workdir),
          *pretrain_data(tmp_path / "records"), "--config.data.batch_size=4",
          f"--config.train.total_steps={STEPS}", "--config.train.log_every=1",
          f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.train.keep_last=3",
          "--config.train.progress=false"]


def _complete_steps(checkpoints: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())


def _losses(log_text: str) -> dict[int, str]:
  """Step -> the logged loss, as printed (the last time the step was logged)."""
  found = re.findall(r"^\[train\] step (\d+):.* loss ([^,]+),", log_text, re.MULTILINE)
  return {int(step): loss for step, loss in found}


def _stop(cli: Callable[..., CliRun], stop: str, tmp_path: pathlib.Path, run_s: float,
          rng: np.random.Generator, index: int) -> dict[str, Any]:
  """One run of the command, ended as `stop` says; what happened."""
  checkpoints = tmp_path / "stopped" / "checkpoints"
  latest = _complete_steps(checkpoints)[-1] if checkpoints.is_dir() else 0
  signum = signal.Signals[stop.split()[0]]
  outcome: dict[str, Any] = {"stop": stop}
  marker = tmp_path / f"paused-{index}"
  env = cli_env(tmp_path, 2)
  if "in the save" in stop:
    outcome["step"] = latest + CHECKPOINT_EVERY * int(rng.integers(1, 3))
    env[PAUSE_SAVE_ENV] = f"{outcome['step']}:{marker}"
  run = cli(_args(tmp_path, tmp_path / "stopped"), env)
  if "in the save" in stop:
    staging = pathlib.Path(run.wait_for_file(marker, run_s))
    assert staging.name == f"{outcome['step']}{TMP_MARK}" and staging.is_dir()
    run.process.send_signal(signum)
    if signum != signal.SIGKILL:
      run.wait_for(rf"^{signum.name} received: stopping", run_s)
      marker.unlink()
  else:
    outcome["step"] = latest + int(rng.integers(1, 4))
    run.wait_for(rf"^\[train\] step {outcome['step']}:", run_s)
    time.sleep(float(rng.uniform(0.0, 0.3)))  # any moment will do: nothing below depends on it
    run.process.send_signal(signum)
  status = run.finish(run_s)
  outcome.update(status=status, output=run.output, complete=_complete_steps(checkpoints))
  return outcome


def test_stopped_and_killed_runs_resume_to_bitwise_the_same_parameters(cli, tmp_path) -> None:
  """The command runs straight, then again in a fresh directory, ended each time as `STOPS` says
  and rerun, until it finishes. SIGTERM and SIGINT: exit 143 and 130 with the checkpoint of the
  step; SIGKILL in a save: that step is never committed. Every rerun resumes from the latest
  complete checkpoint, every step logs the loss of the straight run, and the final parameters are
  the straight run's, bit for bit (CPU, 2 devices)."""
  from hubert_ecg_jax.model_dir import load_model

  write_tiny_records(tmp_path / "records", 12, 2)
  began = time.monotonic()
  straight = cli(_args(tmp_path, tmp_path / "straight"), cli_env(tmp_path, 2))
  assert straight.finish(timeout_s(RUN_S)) == 0, straight.output[-3000:]
  straight_losses = _losses(straight.output)
  run_s = timeout_s(max(60.0, 3 * (time.monotonic() - began)))
  rng = np.random.default_rng(8)
  outcomes = [_stop(cli, stop, tmp_path, run_s, rng, index) for index, stop in enumerate(STOPS)]
  final = cli(_args(tmp_path, tmp_path / "stopped"), cli_env(tmp_path, 2))
  assert final.finish(run_s) == 0, final.output[-3000:]
  print(f"\n{len(STOPS) + 2} runs in {time.monotonic() - began:.1f} s")

  losses: dict[int, str] = {}
  for outcome, after in zip(outcomes, [*outcomes[1:], {"output": final.output}]):
    print(f"  {outcome['stop']} {outcome['step']}: exit {outcome['status']}, "
          f"complete {outcome['complete']}")
    losses.update(_losses(outcome["output"]))
    # The next run resumed from the latest complete checkpoint, never a partly written one.
    resumed = re.search(r"^resumed from step (\d+)", after["output"], re.MULTILINE)
    assert resumed and int(resumed.group(1)) == outcome["complete"][-1], after["output"][-2000:]
    name = outcome["stop"].split()[0]
    if name != "SIGKILL":
      assert outcome["status"] == 128 + signal.Signals[name].value, outcome["output"][-3000:]
      assert f"{name} received: checkpointed step {outcome['step']}, stopping" in outcome["output"]
      assert outcome["complete"][-1] == outcome["step"]
    else:
      assert outcome["status"] == -signal.SIGKILL, outcome["output"][-3000:]
    if outcome["stop"].startswith("SIGKILL in the save"):
      assert outcome["complete"][-1] < outcome["step"]
  losses.update(_losses(final.output))

  checkpoints = tmp_path / "stopped" / "checkpoints"
  assert not list(checkpoints.glob(f"*{TMP_MARK}*"))  # rewritten, then renamed
  # The data position is staged in a hidden folder of checkpoints/ with a fixed name, not in
  # TMPDIR: what a kill left there the next save replaced, and the last save moved it into place.
  assert not list((tmp_path / "tmp").glob("data-position-*"))
  assert not list(checkpoints.glob(".data-position-*"))
  # Every step, including those run again after a kill, logged the same loss as the straight run.
  assert losses == straight_losses and sorted(straight_losses) == list(range(1, STEPS + 1))
  config, params, metadata = load_model(tmp_path / "stopped" / "model")
  straight_config, straight_params, straight_metadata = load_model(tmp_path / "straight" / "model")
  assert config == straight_config and metadata["step"] == straight_metadata["step"] == STEPS
  assert jax.tree.structure(params) == jax.tree.structure(straight_params)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(straight_params)):
    np.testing.assert_array_equal(ours, theirs)
