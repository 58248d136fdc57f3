"""SIGTERM and SIGINT through `hubert-ecg-jax finetune` (`pretrain`'s are in test_preemption.py).

A signalled run checkpoints the step it is at and exits 128 + the signal (143 for SIGTERM, 130 for
SIGINT); rerunning the same command logs `resumed from step N` and ends bitwise as an
uninterrupted run. Each signal is sent while the run holds in the checkpoint save of a known step
(`HUBERT_ECG_JAX_TEST_PAUSE_SAVE`, train/checkpointing.py), so nothing races: the run stops at that
step, a validation step whose checkpoint is written anyway. That a signal between checkpoints
writes one of its own, and a second Ctrl-C, are tested in-process at exact steps (test_loop.py).
"""
from __future__ import annotations

import pathlib
import re
import signal
import warnings
from typing import Any, Callable

import jax
import numpy as np

from conftest import (CliRun, assert_same_tree, cli_env, tensorboard_scalars, timeout_s,
                      write_tiny_records)

Start = Callable[..., CliRun]  # the `cli` fixture

STEPS = 8
EVAL_EVERY = 2  # validations, hence checkpoints, at steps 2, 4, 6, 8
RUN_S = 300  # hang guard of one run (the first ones compile the steps)


def _args(workdir: pathlib.Path, records: pathlib.Path) -> list[str]:
  return ["finetune", "finetune_demo", str(workdir), f"--config.data.train={records / 'train'}",
          f"--config.data.val={records / 'val'}", "--config.train.batch_size=4",
          f"--config.train.steps={STEPS}", f"--config.train.eval_every={EVAL_EVERY}",
          "--config.train.log_every=1", "--config.train.patience=100",
          "--config.train.keep_checkpoints=2", "--config.train.progress=false",
          "--config.eval.batch_size=8"]


def _complete_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())


def _stopped(cli: Start, args: list[str], tmp_path: pathlib.Path, step: int,
             signum: signal.Signals) -> CliRun:
  """Runs the command and signals it while it holds in the save of `step`; checks the exit status,
  the stop line and the checkpoint of `step`."""
  marker = tmp_path / f"paused-{step}"
  run = cli(args, cli_env(tmp_path, 2, HUBERT_ECG_JAX_TEST_PAUSE_SAVE=f"{step}:{marker}"))
  run.wait_for_file(marker, timeout_s(RUN_S))
  run.process.send_signal(signum)
  run.wait_for(rf"^{signum.name} received: stopping with a checkpoint", timeout_s(60))
  marker.unlink()
  assert run.finish(timeout_s(120)) == 128 + signum.value, run.output[-3000:]
  assert f"{signum.name} received: checkpointed step {step}, stopping" in run.lines
  assert _complete_steps(pathlib.Path(args[2]))[-1] == step
  assert not re.search(rf"^\[train\] step {step + 1}:", run.output, re.MULTILINE)
  return run


def _resumed_from(run: CliRun) -> int:
  return int(run.wait_for(r"^resumed from step (\d+)", 0).group(1))


def _final_state(workdir: pathlib.Path) -> Any:
  """The training state (params, optimizer, early stopping) of the last checkpoint, as numpy."""
  from orbax.checkpoint import v1 as ocp

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "Sharding info not provided": as saved is right
    state = ocp.load_checkpointables(workdir / "checkpoints" / str(STEPS), {"state": None})["state"]
  return jax.tree.map(np.asarray, state)


def _assert_same_curves(workdir: pathlib.Path, straight: pathlib.Path) -> None:
  """Every train and validation value logged to TensorBoard, each step, as the straight run's."""
  ours, theirs = ({key: values for key, values in tensorboard_scalars(run / "tensorboard").items()
                   if not key[0].endswith("ecg_per_s")} for run in (workdir, straight))
  assert {step for _, step in theirs} == set(range(1, STEPS + 1))
  assert ours == theirs


def test_finetune_stops_on_sigterm_and_sigint_and_resumes_to_the_bit(cli, tmp_path) -> None:
  """SIGTERM in the save of step 2, SIGINT in that of step 4; the rerun ends with the training
  state, best model and logged values of an uninterrupted run; `keep_checkpoints` 2 keeps 6, 8."""
  from hubert_ecg_jax.inference import load_classifier

  records = tmp_path / "records"
  write_tiny_records(records / "train", 16, 2, ("A", "B"), targets=False)
  write_tiny_records(records / "val", 8, 1, ("A", "B"), targets=False, seed=1)
  straight = cli(_args(tmp_path / "straight", records), cli_env(tmp_path, 2))
  args = _args(tmp_path / "run", records)
  _stopped(cli, args, tmp_path, 2, signal.SIGTERM)
  assert _resumed_from(_stopped(cli, args, tmp_path, 4, signal.SIGINT)) == 2
  finished = cli(args, cli_env(tmp_path, 2))
  assert finished.finish(timeout_s(RUN_S)) == 0, finished.output[-3000:]
  assert _resumed_from(finished) == 4
  assert straight.finish(timeout_s(RUN_S)) == 0, straight.output[-3000:]

  best = r"^best validation score (\S+) at step (\d+)"
  assert finished.wait_for(best, 0).groups() == straight.wait_for(best, 0).groups()
  _assert_same_curves(tmp_path / "run", tmp_path / "straight")
  assert _complete_steps(tmp_path / "run") == _complete_steps(tmp_path / "straight") == [6, 8]
  assert_same_tree(_final_state(tmp_path / "run"), _final_state(tmp_path / "straight"))
  ours = load_classifier(tmp_path / "run" / "best_model")
  theirs = load_classifier(tmp_path / "straight" / "best_model")
  assert_same_tree(ours.params, theirs.params)
  np.testing.assert_array_equal(ours.thresholds, theirs.thresholds)
