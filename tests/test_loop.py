"""The training loop: resume to the bit, graceful SIGTERM, validation, best checkpoint, export."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal

import jax
import numpy as np
import pytest

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.model_dir import load_model
from hubert_ecg_jax.parallel import DevicePrefetch
from hubert_ecg_jax.train.checkpointing import CheckpointManager
from hubert_ecg_jax.train.engine import Engine
from hubert_ecg_jax.train.loop import LoopConfig, Pretrainer
from hubert_ecg_jax.data.masking import sample_span_mask
from hubert_ecg_jax.train.optimizer import OptimizerConfig

from conftest import pretrain_data, units_dir, write_tiny_records

TOTAL_STEPS = 30
BATCH = 8
CLASSES = 5


class ToyBatches:
  """Deterministic, resumable batches with a learnable target.

  Each ECG is a noisy sinusoid of one of 5 frequencies; every frame's unit is its class, so
  masked frames are predictable from the unmasked ones.
  """

  def __init__(self, seed: int = 0, stop_at: int | None = None, corrupt: bool = False,
               signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
    self.index, self.seed, self.stop_at, self.corrupt = 0, seed, stop_at, corrupt
    self.signals = signals  # sent, in turn, when batch `stop_at` is asked for

  def __iter__(self):
    return self

  def batch(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    classes = rng.integers(0, CLASSES, BATCH)
    t = np.arange(6000) / 100.0
    x = np.sin(2 * np.pi * (5 + 5 * classes[:, None]) * t) + 0.1 * rng.normal(size=(BATCH, 6000))
    if self.corrupt:
      x[:, 10] = np.nan
    return {"x": x.astype(np.float32), "attention_mask": np.ones((BATCH, 6000), np.int32),
            "targets": np.repeat(classes[:, None, None], 93, axis=2).astype(np.int32),
            "mask_time_indices": sample_span_mask(rng, BATCH, 93),
            "record_id": np.array([f"r{index}-{i}" for i in range(BATCH)])}  # extra keys are fine

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index == self.stop_at:
      for signum in self.signals:  # as a scheduler or a user would, in the middle of the run
        os.kill(os.getpid(), signum)
    self.index += 1
    return self.batch(self.index - 1)

  def save(self, path: str) -> None:
    pathlib.Path(path).write_text(json.dumps(self.index))

  def restore(self, path: str) -> None:
    self.index = json.loads(pathlib.Path(path).read_text())


def _validation():
  return [ToyBatches(seed=99).batch(i) for i in range(2)]


@pytest.fixture(scope="module")
def trainer():
  # Dropout and layerdrop on: the resumed run must draw the same random numbers.
  config = HubertECGConfig.preset("tiny", num_hidden_layers=1, hidden_dropout=0.1, layerdrop=0.3)
  optimizer = OptimizerConfig(total_steps=TOTAL_STEPS, learning_rate=1e-2, grad_clip_norm=1.0)
  loop = LoopConfig(total_steps=TOTAL_STEPS, log_every=5, val_every=10, checkpoint_every=5,
                    keep_last=2, keep_best=1, max_nonfinite_streak=2, progress=False)
  lines: list[str] = []
  pretrainer = Pretrainer(config, optimizer, loop, devices=jax.devices(), print_fn=lines.append)
  return pretrainer, lines


@pytest.fixture(scope="module")
def straight_run(trainer, tmp_path_factory):
  pretrainer, lines = trainer
  workdir = tmp_path_factory.mktemp("straight")
  start = len(lines)
  result = pretrainer.run(workdir, ToyBatches(), _validation)
  return workdir, result, lines[start:]


def _final_state(pretrainer: Pretrainer, workdir: pathlib.Path):
  manager = CheckpointManager(workdir / "checkpoints")
  state = manager.restore(pretrainer._abstract_state())
  manager.close()
  return jax.tree.map(np.asarray, state)


def test_loss_falls_on_a_learnable_target(straight_run) -> None:
  _, result, lines = straight_run
  losses = [float(line.split("loss ")[1].split(",")[0]) for line in lines
            if line.startswith("[train]")]
  assert result.stop_reason == "finished" and result.step == TOTAL_STEPS
  assert len(losses) == 1 + TOTAL_STEPS // 5  # step 1, then every 5
  # From chance over 100 units (ln 100 = 4.6) to well below chance over the 5 classes (ln 5 = 1.6).
  assert losses[0] > 4.0 and losses[-1] < 0.8, losses
  assert result.val_loss < 0.8
  assert any(line.startswith("[val] step 10: accuracy") for line in lines)
  assert "ecg_per_s" in result.metrics


def _assert_same_final_state(pretrainer: Pretrainer, workdir: pathlib.Path,
                             straight_dir: pathlib.Path) -> None:
  resumed, straight = _final_state(pretrainer, workdir), _final_state(pretrainer, straight_dir)
  assert jax.tree.structure(resumed) == jax.tree.structure(straight)
  for ours, theirs in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_by_a_signal_and_resume_is_bit_identical(trainer, straight_run, tmp_path, capfd,
                                                      signum) -> None:
  """The signal comes while step 14 runs (no checkpoint is due there): the run finishes the step,
  checkpoints it and stops; a rerun resumes from it and ends as the straight run."""
  pretrainer, lines = trainer
  straight_dir, _, _ = straight_run
  first = pretrainer.run(tmp_path, ToyBatches(stop_at=13, signals=(signum,)), _validation)
  assert first.stop_reason == signum.name and first.step == 14 and first.model_dir is None
  assert f"{signum.name} received: stopping with a checkpoint" in capfd.readouterr().err
  assert lines[-1] == f"{signum.name} received: checkpointed step 14, stopping"
  manager = CheckpointManager(tmp_path / "checkpoints")
  assert manager.latest_step == 14
  manager.close()
  second = pretrainer.run(tmp_path, ToyBatches(), _validation)  # a new iterator, from index 0
  assert second.stop_reason == "finished" and second.step == TOTAL_STEPS
  assert any(line.startswith("resumed from step 14") for line in lines)
  _assert_same_final_state(pretrainer, tmp_path, straight_dir)
  assert second.val_loss == straight_run[1].val_loss


def test_a_second_ctrl_c_interrupts_at_once(trainer, straight_run, tmp_path) -> None:
  """Two SIGINTs while step 14 runs: KeyboardInterrupt, no checkpoint of step 14 (the periodic ones
  stay); a rerun resumes from the latest of those and ends as the straight run."""
  pretrainer, lines = trainer
  start = len(lines)
  with pytest.raises(KeyboardInterrupt):
    pretrainer.run(tmp_path, ToyBatches(stop_at=13, signals=(signal.SIGINT, signal.SIGINT)),
                   _validation)
  assert not any("checkpointed step" in line for line in lines[start:])
  manager = CheckpointManager(tmp_path / "checkpoints")
  assert manager.steps == [5, 10]
  manager.close()
  assert pretrainer.run(tmp_path, ToyBatches(), _validation).step == TOTAL_STEPS
  assert any(line.startswith("resumed from step 10") for line in lines[start:])
  _assert_same_final_state(pretrainer, tmp_path, straight_run[0])


def test_checkpoints_keep_last_and_best_and_models_are_exported(trainer, straight_run) -> None:
  pretrainer, _ = trainer
  workdir, result, lines = straight_run
  val_losses = {int(line.split()[2][:-1]): float(line.split("loss ")[1].split(",")[0])
                for line in lines if line.startswith("[val]")}
  assert sorted(val_losses) == [10, 20, 30]
  best = min(val_losses, key=val_losses.get)
  manager = CheckpointManager(workdir / "checkpoints")
  assert manager.best_step == best
  assert manager.steps == sorted({25, 30, best})
  manager.close()
  config, params, metadata = load_model(workdir / "model")
  assert config == pretrainer.model_config and metadata["step"] == TOTAL_STEPS
  final = _final_state(pretrainer, workdir)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(final.params)):
    np.testing.assert_array_equal(ours, theirs)
  assert load_model(workdir / "model_best")[2]["step"] == best
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_stops_after_non_finite_steps_in_a_row(trainer, tmp_path) -> None:
  pretrainer, lines = trainer
  result = pretrainer.run(tmp_path, ToyBatches(corrupt=True))
  # The streak is read one step late, and the batches already on the devices are trained (skipped
  # here) before the checkpoint, so that its data position is that of the steps taken.
  assert result.stop_reason == "nonfinite" and result.step <= 3 + pretrainer.loop.device_prefetch
  assert any("2 steps in a row had a non-finite loss" in line for line in lines)
  state = _final_state(pretrainer, tmp_path)
  fresh = jax.tree.map(np.asarray, pretrainer._new_state(None))
  for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh.params)):
    np.testing.assert_array_equal(ours, theirs)
  assert int(state.skipped_steps) == result.step


def test_device_prefetch_places_ahead_within_the_room_given() -> None:
  placed: list[int] = []
  feed = DevicePrefetch(iter(range(5)), lambda item: placed.append(item) or item * 10, ahead=2)
  assert next(feed) == 0 and feed.pending == 0  # nothing ahead yet: placed when asked
  feed.fill(room=1)  # e.g. one step before a checkpoint
  assert placed == [0, 1] and feed.pending == 1
  feed.fill(room=5)
  assert placed == [0, 1, 2] and feed.pending == 2  # never more than `ahead`
  assert [next(feed), next(feed)] == [10, 20]
  feed.fill(room=5)
  feed.fill(room=5)  # the items ran out: what was placed is still taken, then StopIteration
  assert [next(feed), next(feed)] == [30, 40]
  with pytest.raises(StopIteration):
    next(feed)


def test_prefetch_changes_no_number_mesh(trainer, straight_run, tmp_path) -> None:
  """The straight run placed 2 batches ahead; without prefetch the same compiled step ends in the
  same state, bit for bit."""
  pretrainer, lines = trainer
  engine = pretrainer.engine
  without = dataclasses.replace(pretrainer.loop, device_prefetch=0)
  pretrainer.engine = Engine(pretrainer.launcher, without, lines.append)
  try:
    assert pretrainer.run(tmp_path, ToyBatches(), _validation).step == TOTAL_STEPS
  finally:
    pretrainer.engine = engine
  _assert_same_final_state(pretrainer, tmp_path, straight_run[0])


def test_prefetch_and_exact_resume_pmap(trainer, tmp_path) -> None:
  """pmap launcher, 8 steps, a checkpoint every 4: prefetch 0 straight == prefetch 2 stopped by
  SIGTERM while batch 5 is placed, resumed, bit for bit."""
  config = trainer[0].model_config
  optimizer = OptimizerConfig(total_steps=8, learning_rate=1e-2, grad_clip_norm=1.0)
  loop = LoopConfig(total_steps=8, log_every=4, val_every=None, checkpoint_every=4, progress=False,
                    launcher="pmap")
  lines: list[str] = []
  pretrainer = Pretrainer(config, optimizer, loop, devices=jax.devices(), print_fn=lines.append)

  def run(workdir: pathlib.Path, prefetch: int, batches: ToyBatches):
    # The same launcher (one compilation), another engine schedule.
    pretrainer.engine = Engine(pretrainer.launcher,
                               dataclasses.replace(loop, device_prefetch=prefetch), lines.append)
    return pretrainer.run(workdir, batches)

  straight = run(tmp_path / "straight", 0, ToyBatches())
  stopped = run(tmp_path / "stopped", 2, ToyBatches(stop_at=5))
  # Step 5 dispatched, batches 5 and 6 are placed (the signal comes with 5); they are trained, then
  # checkpointed with the position after batch 6.
  assert stopped.stop_reason == "SIGTERM" and stopped.step == 7
  assert json.loads((tmp_path / "stopped/checkpoints/7/data/process_0/position").read_text()) == 7
  resumed = run(tmp_path / "stopped", 2, ToyBatches())
  assert straight.step == resumed.step == 8
  _assert_same_final_state(pretrainer, tmp_path / "stopped", tmp_path / "straight")


def test_batches_are_checked_with_clear_errors(trainer) -> None:
  pretrainer, _ = trainer
  batch = ToyBatches().batch(0)
  with pytest.raises(ValueError, match=r"batch lacks \['mask_time_indices'\]"):
    pretrainer.check_batch({k: v for k, v in batch.items() if k != "mask_time_indices"}, True)
  bad = dict(batch, targets=batch["targets"] + 100)
  with pytest.raises(ValueError, match=r"codebook 0 must lie in \[0, 100\), found units from 100"):
    pretrainer.check_batch(bad, True)
  with pytest.raises(ValueError, match="x must be float32"):
    pretrainer.check_batch(dict(batch, x=batch["x"].astype(np.float64)), True)
  with pytest.raises(ValueError, match=r"targets must have shape \(8, 1, 93\)"):
    pretrainer.check_batch(dict(batch, targets=batch["targets"][:, :, :90]), True)
  with pytest.raises(ValueError, match="learning-rate schedule is for 10 steps but the run is 30"):
    Pretrainer(pretrainer.model_config, OptimizerConfig(total_steps=10), pretrainer.loop)


def test_pretrain_command_on_records_with_the_pmap_launcher(tmp_path, capsys) -> None:
  from hubert_ecg_jax.cli import main

  write_tiny_records(tmp_path / "records", 12, 2)
  overrides = [*pretrain_data(tmp_path / "records"),
               f"--config.data.val_dir={tmp_path / 'records'}",
               f"--config.data.val_units={units_dir(tmp_path / 'records')}", "--config.data.batch_size=8",
               "--config.train.total_steps=2", "--config.train.progress=false",
               "--config.train.launcher=pmap"]
  assert main(["pretrain", "demo_pretrain", str(tmp_path / "run"), *overrides]) == 0
  out = capsys.readouterr().out
  assert "[train] step 2:" in out and "[val] step 2:" in out
  config, _, metadata = load_model(tmp_path / "run" / "model")
  assert config.hidden_size == 32 and metadata["step"] == 2
  assert main(["pretrain", "demo_pretrain", str(tmp_path / "run2"), *overrides,
               "--config.model.vocab_sizes=100,100"]) == 1
  assert "the units in" in capsys.readouterr().err
  assert main(["pretrain", "demo_pretrain", str(tmp_path / "run3"), *overrides,
               "--config.train.per_device_batch=3"]) == 1
  assert ("a batch of 8 over 8 device(s) does not split into micro-batches of per_device_batch=3: "
          "expected a multiple of devices x per_device_batch = 24, found 8") in capsys.readouterr().err
