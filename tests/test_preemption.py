"""Preemption: damaged checkpoints are skipped with a warning; SIGKILLed runs resume to the bit."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import warnings
from typing import Any

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


# -- SIGKILL at random moments ---------------------------------------------------------------------
STEPS = 24
CHECKPOINT_EVERY = 2
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes `<step>.orbax-checkpoint-tmp-<time>`, then renames
KILLS = ("write", "random", "write", "random", "write", "random")


def _records(directory: pathlib.Path) -> None:
  from hubert_ecg_jax.data import records
  from hubert_ecg_jax.data.synthetic import write_units

  rng = np.random.default_rng(0)
  stored = [records.StoredRecord(
      record_id=f"r{i}", source=f"r{i}.hea", labels=np.zeros(1, np.float32), source_fs=500.0,
      signal=rng.normal(size=(12, 2500)).astype(np.float32)) for i in range(12)]
  records.write_records(directory / "records", stored, ["none"], num_shards=2)
  write_units(directory / "records", directory / "units",
              lambda record_id: rng.integers(0, 100, (1, 93)), [100])


class _Runs:
  """Launches `hubert-ecg-jax pretrain` in a subprocess, the same way each time."""

  def __init__(self, tmp_path: pathlib.Path):
    _records(tmp_path / "data")
    (tmp_path / "tmp").mkdir()
    self.env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(tmp_path / "tmp"),
        # Restarts reuse the compiled steps (the same executables, so the same numbers).
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    self.overrides = [f"--config.data.train_dir={tmp_path / 'data' / 'records'}",
                      f"--config.data.train_units={tmp_path / 'data' / 'units'}",
                      "--config.data.batch_size=4",
                      f"--config.train.total_steps={STEPS}", "--config.train.log_every=1",
                      f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.train.keep_last=3",
                      "--config.train.progress=false"]
    self.count = 0

  def start(self, workdir: pathlib.Path) -> tuple[subprocess.Popen, pathlib.Path]:
    self.count += 1
    log = workdir.parent / f"{workdir.name}-{self.count}.log"
    command = [sys.executable, "-m", "hubert_ecg_jax.cli", "pretrain", "demo_pretrain", str(workdir),
               *self.overrides]
    with open(log, "w") as out:
      return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env), log


def _complete_steps(checkpoints: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())


def _temporary(checkpoints: pathlib.Path, since: float) -> set[str]:
  """Orbax's temporary checkpoint directories changed since `since` (one name per step: a
  killed run's leftover is reused when the step is written again)."""
  found = set()
  for path in checkpoints.glob(f"*{TMP_MARK}*") if checkpoints.is_dir() else ():
    try:
      if path.stat().st_mtime >= since:
        found.add(path.name)
    except FileNotFoundError:  # renamed into place meanwhile
      pass
  return found


def _losses(log_text: str) -> dict[int, str]:
  """Step -> the logged loss, as printed (the last time the step was logged)."""
  found = re.findall(r"^\[train\] step (\d+):.* loss ([^,]+),", log_text, re.MULTILINE)
  return {int(step): loss for step, loss in found}


def _kill_and_resume(runs: _Runs, workdir: pathlib.Path, rng: np.random.Generator) -> dict[str, Any]:
  """Reruns the command until it finishes, SIGKILLing it as `KILLS` says; what happened."""
  checkpoints = workdir / "checkpoints"
  kills: list[dict[str, Any]] = []
  resumes: list[tuple[int, int]] = []  # (the step logged on resume, the latest complete step)
  losses: dict[int, str] = {}
  while True:
    before = _complete_steps(checkpoints) if checkpoints.is_dir() else []
    since = time.time()
    process, log = runs.start(workdir)
    plan = KILLS[len(kills)] if len(kills) < len(KILLS) else None
    writes = int(rng.integers(1, 3))  # "write": kill as the 1st or 2nd checkpoint write starts
    after_step, delay = 0, float(rng.uniform(0.0, 0.3))  # "random": after a step is logged, wait
    started, killed, seen = time.monotonic(), None, set()
    while process.poll() is None and killed is None:
      assert time.monotonic() - started < 120, f"run {runs.count} hangs: {log.read_text()[-2000:]}"
      if plan == "write":
        new = _temporary(checkpoints, since)
        seen |= new
        if len(seen) >= writes and new:
          process.kill()
          killed = {"plan": plan, "writing": min(new)}
      elif plan == "random":
        logged = _losses(log.read_text())
        if logged and not after_step:
          after_step = min(logged) + int(rng.integers(0, 4))
        if after_step in logged:
          time.sleep(delay)
          process.kill()
          killed = {"plan": plan, "after_step": after_step, "delay": delay}
      time.sleep(0.002)
    process.wait()
    text = log.read_text()
    losses.update(_losses(text))
    resumed = re.search(r"^resumed from step (\d+)", text, re.MULTILINE)
    if before:
      assert resumed, f"run {runs.count} did not resume: {text[-2000:]}"
      resumes.append((int(resumed.group(1)), before[-1]))
    if killed is None:
      assert process.returncode == 0, text[-3000:]
      return {"kills": kills, "resumes": resumes, "losses": losses, "runs": runs.count}
    assert process.returncode == -signal.SIGKILL
    # Killed while writing: the temporary directory is there and its step was not finalised.
    interrupted = [name for name in _temporary(checkpoints, since)
                   if not (checkpoints / name.split(".")[0]).exists()]
    killed["interrupted_step"] = int(interrupted[0].split(".")[0]) if interrupted else None
    killed["complete_after"] = _complete_steps(checkpoints)
    kills.append(killed)


def test_sigkill_at_random_moments_resumes_to_bitwise_the_same_parameters(tmp_path) -> None:
  from hubert_ecg_jax.model_dir import load_model

  runs = _Runs(tmp_path)
  began = time.monotonic()
  process, log = runs.start(tmp_path / "straight")
  assert process.wait() == 0, log.read_text()[-3000:]
  straight_losses = _losses(log.read_text())
  straight_s = time.monotonic() - began
  outcome = _kill_and_resume(runs, tmp_path / "killed", np.random.default_rng(8))
  kills, resumes = outcome["kills"], outcome["resumes"]
  print(f"\nstraight run {straight_s:.1f} s; {len(kills)} kills and {outcome['runs'] - 1} runs in "
        f"{time.monotonic() - began - straight_s:.1f} s")
  for kill, (resumed, latest) in zip(kills, resumes):
    print(f"  {kill} -> resumed from step {resumed}")

  leaked = list((tmp_path / "tmp").glob("data-position-*"))  # staged positions a kill left behind
  print(f"  data-position staging directories left in TMPDIR: {len(leaked)}")
  assert len(kills) >= 5
  during_write = [kill for kill in kills if kill["interrupted_step"] is not None]
  assert len(during_write) >= 3, kills
  # A partly written checkpoint is never restored: each run resumed from the latest complete one.
  assert len(resumes) == len(kills)
  for kill, (resumed, latest) in zip(kills, resumes):
    assert resumed == latest == kill["complete_after"][-1]
    if kill["interrupted_step"] is not None:
      assert resumed < kill["interrupted_step"]
  assert not _temporary(tmp_path / "killed" / "checkpoints", 0.0)  # rewritten, then renamed
  # Every step, including those run again after a kill, logged the same loss as the straight run.
  assert outcome["losses"] == straight_losses and sorted(straight_losses) == list(range(1, STEPS + 1))
  config, params, metadata = load_model(tmp_path / "killed" / "model")
  straight_config, straight_params, straight_metadata = load_model(tmp_path / "straight" / "model")
  assert config == straight_config and metadata["step"] == straight_metadata["step"] == STEPS
  assert jax.tree.structure(params) == jax.tree.structure(straight_params)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(straight_params)):
    np.testing.assert_array_equal(ours, theirs)
