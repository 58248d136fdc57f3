"""Damaged shards met during training: strict runs stop with one line naming the shard and resume
once it is replaced; with data.skip_corrupted the unreadable records are left out and counted."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hubert_ecg_jax import cli
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data import pipeline as P
from hubert_ecg_jax.data import records as R
from hubert_ecg_jax.data import units as U
from hubert_ecg_jax.data.synthetic import write_units
from hubert_ecg_jax.data.verify import check_shard
from hubert_ecg_jax.finetune.data import read_labels
from hubert_ecg_jax.train.checkpointing import CheckpointManager, DataPosition, abstract_like
from hubert_ecg_jax.train.loop import LoopConfig, Pretrainer
from hubert_ecg_jax.train.optimizer import OptimizerConfig
from test_loop import ToyBatches

BAD = 1  # the damaged shard


def _write(directory: pathlib.Path, shards: int, per_shard: int, units: bool = False) -> pathlib.Path:
  """Records of noise with labels [i % 2, 1 - i % 2] (and units of K 100 beside them)."""
  rng = np.random.default_rng(0)
  stored = [R.StoredRecord(record_id=f"r{i:03d}", source=f"r{i:03d}.hea",
                           labels=np.array([i % 2, 1 - i % 2], np.float32), source_fs=500.0,
                           signal=rng.normal(size=(12, 2500)).astype(np.float32))
            for i in range(shards * per_shard)]
  R.write_records(directory / "records", stored, ["a", "b"], num_shards=shards)
  if units:
    write_units(directory / "records", directory / "units", lambda _: rng.integers(0, 100, (1, 93)),
                [100])
  return directory


def _flip(path: pathlib.Path) -> bytes:
  """Flips 64 bytes in the middle of `path` (as a failing disk would); returns the sound bytes."""
  sound = path.read_bytes()
  data = bytearray(sound)
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))
  return sound


def _shard(directory: pathlib.Path, shards: int) -> pathlib.Path:
  return directory / "records" / R.shard_file_name(BAD, shards)


def _readable(path: pathlib.Path) -> int:
  """Records of a shard that can be read, by `verify`'s own check (an oracle apart from the pipeline)."""
  return check_shard(str(path), 0, lambda serialized: "").read


def _checkpoints(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())


def _config(**changes) -> P.PipelineConfig:
  values = dict(batch_size=4, seed=3, shuffle_buffer=4, process_index=0, process_count=1)
  return P.PipelineConfig(**dict(values, **changes))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> pathlib.Path:
  return _write(tmp_path_factory.mktemp("small"), shards=3, per_shard=6, units=True)


def test_a_damaged_shard_stops_every_reader_with_a_message_naming_it(small, tmp_path):
  data = pathlib.Path(shutil.copytree(small, tmp_path / "data"))
  bad = _shard(data, 3)
  _flip(bad)
  read = _readable(bad)
  assert 0 < read < 6
  expected = f"{bad}: record {read + 1} of 6 cannot be read"
  with pytest.raises(P.CorruptShardError, match=re.escape(expected)) as caught:
    next(P.make_train_iterator(data / "records", _config()))
  message = str(caught.value)
  assert "\n" not in message and f"`hubert-ecg-jax verify {bad.parent}`" in message
  assert "resumes from the last complete checkpoint" in message
  assert "--config.data.skip_corrupted=true" in message
  with pytest.raises(P.CorruptShardError, match=re.escape(expected)) as caught:
    list(P.make_eval_iterator(data / "records", _config()))  # validation never skips
  assert "skip_corrupted" not in str(caught.value)
  with pytest.raises(P.CorruptShardError, match=re.escape(expected)):
    read_labels(data / "records")  # fine-tuning reads the training labels first
  with pytest.raises(P.CorruptShardError, match=re.escape(f"{bad}: unreadable after {read} record")):
    list(R.iterate_records(data / "records"))  # a fine-tuning fraction copies records one by one
  # A units shard: named, with the command that writes it again.
  bad.write_bytes((small / "records" / bad.name).read_bytes())
  units = data / "units" / U.units_file_name(R.shard_file_name(2, 3))
  _flip(units)
  with pytest.raises(P.CorruptShardError, match=re.escape(f"{units}: record ")) as caught:
    next(P.make_train_iterator(data / "records", _config(train_crop="first"), data / "units"))
  assert "rerun the `hubert-ecg-jax targets` command" in str(caught.value)


def test_a_position_saved_after_the_damage_was_met_is_never_resumed(small, tmp_path):
  data = pathlib.Path(shutil.copytree(small, tmp_path / "data"))
  _flip(_shard(data, 3))
  iterator = P.make_train_iterator(data / "records", _config())
  with pytest.raises(P.CorruptShardError):
    next(iterator)
  with pytest.raises(P.CorruptShardError):
    iterator.check_damage()  # what the engine calls before each checkpoint
  # Had the reader met the damage during the write itself, the position would still be kept out:
  state = {"w": jnp.zeros(3)}
  manager = CheckpointManager(tmp_path / "checkpoints", keep_last=5, keep_best=0)
  manager.save(1, state, DataPosition(P.make_train_iterator(small / "records", _config())))
  manager.save(2, state, DataPosition(iterator))
  manager.close()
  position = tmp_path / "checkpoints" / "2" / "data" / "process_0" / "position"
  assert not pathlib.Path(f"{position}.index").exists()  # the state past the damage is not kept
  with pytest.raises(P.CorruptShardError, match="saved after the input met a damaged shard"):
    P.make_train_iterator(small / "records", _config()).restore(position)
  manager = CheckpointManager(tmp_path / "checkpoints", keep_last=5, keep_best=0)
  with pytest.warns(UserWarning, match=r"checkpoints/2 cannot be read .*trying step 1 instead"):
    manager.restore(abstract_like(state, state["w"].sharding),
                    DataPosition(P.make_train_iterator(small / "records", _config())))
  assert manager.restored_step == 1
  manager.close()


def test_a_position_saved_before_the_damage_resumes_skipping_or_on_the_replaced_shard(tmp_path):
  data = _write(tmp_path / "data", shards=3, per_shard=48)
  sound = _flip(_shard(data, 3))
  iterator = P.make_train_iterator(data / "records", _config())
  before = [next(iterator) for _ in range(4)]
  prefix = iterator.save(tmp_path / "position")  # the readers are not yet at the damaged record
  assert pathlib.Path(f"{prefix}.index").is_file()
  with pytest.raises(P.CorruptShardError):
    while True:
      next(iterator)
  # Rerun with skipping: the same position, then the damaged records are left out and counted.
  notes = []
  skipping = P.make_train_iterator(data / "records", _config(skip_corrupted=True), log=notes.append)
  skipping.restore(prefix)
  assert sum(next(skipping)[P.SKIPPED] for _ in range(40)) == 48 - _readable(_shard(data, 3))
  assert len(notes) == 1
  _shard(data, 3).write_bytes(sound)
  resumed = P.make_train_iterator(data / "records", _config())
  resumed.restore(prefix)
  straight = P.make_train_iterator(data / "records", _config())
  for expected in before:
    np.testing.assert_array_equal(next(straight)["record_id"], expected["record_id"])
  for _ in range(40):  # past the damaged record, into the next epoch
    ours, theirs = next(resumed), next(straight)
    for key in theirs:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.parametrize("side", ["records", "units"])
def test_skipping_leaves_out_exactly_the_unreadable_records_and_counts_them(small, tmp_path, side):
  data = pathlib.Path(shutil.copytree(small, tmp_path / "data"))
  name = R.shard_file_name(BAD, 3)
  bad = data / "records" / name if side == "records" else data / "units" / U.units_file_name(name)
  _flip(bad)
  read = _readable(bad)
  lost = 6 - read
  unreadable = {f"r{BAD * 6 + i:03d}" for i in range(read, 6)}
  notes = []
  units = data / "units" if side == "units" else None
  config = _config(batch_size=1, skip_corrupted=True, train_crop="first" if units else "random")
  iterator = P.make_train_iterator(data / "records", config, units, log=notes.append)
  epochs, sound = 5, 18 - lost
  batches = [next(iterator) for _ in range(epochs * sound)]
  seen = [str(b["record_id"][0]) for b in batches]
  assert not unreadable & set(seen)
  assert all(seen.count(f"r{i:03d}") == epochs for i in range(18) if f"r{i:03d}" not in unreadable)
  # Each pass over the shard counts its lost records once, on a record read after it.
  total = sum(b[P.SKIPPED] for b in batches)
  assert total in ((epochs - 1) * lost, epochs * lost), total
  assert notes == [f"skipped {lost} damaged records of {bad} (records {read + 1} to 6 of 6, in "
                   f"every epoch; counted as skipped_records); `hubert-ecg-jax verify {bad.parent}` "
                   "lists the damaged shards"]
  if side == "records":
    ids, labels, _ = read_labels(data / "records", skip_corrupted=True)
    assert len(ids) == len(labels) == sound and not unreadable & set(ids)


def test_skipping_refuses_shards_without_a_readable_record(small, tmp_path):
  data = pathlib.Path(shutil.copytree(small, tmp_path / "data"))
  for index in range(3):
    (data / "records" / R.shard_file_name(index, 3)).write_bytes(b"\0" * 100)  # zeroed, cut
  with pytest.raises(P.CorruptShardError, match="nothing to train on, even skipping"):
    P.make_train_iterator(data / "records", _config(skip_corrupted=True))


class _MeetsDamage(ToyBatches):
  """Toy batches whose reader meets a damaged shard once batch `at` is handed out (during a step)."""

  def __init__(self, at: int):
    super().__init__()
    self.at = at

  def check_damage(self) -> None:
    if self.index >= self.at:
      raise P.CorruptShardError("damaged")

  def __next__(self) -> dict[str, np.ndarray]:
    self.check_damage()
    return super().__next__()


def test_the_engine_writes_no_checkpoint_once_the_reader_met_damage(tmp_path):
  config = HubertECGConfig.preset("tiny", num_hidden_layers=1)
  loop = LoopConfig(total_steps=6, log_every=1, val_every=None, checkpoint_every=1, keep_last=6,
                    progress=False)
  trainer = Pretrainer(config, OptimizerConfig(total_steps=6), loop, devices=jax.devices()[:1],
                       print_fn=lambda line: None)
  with pytest.raises(P.CorruptShardError):
    trainer.run(tmp_path, _MeetsDamage(at=4))
  assert _checkpoints(tmp_path) == [1, 2, 3]  # not 4: its step ran after the damage was met


# -- the commands -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretraining_data(tmp_path_factory) -> pathlib.Path:
  return _write(tmp_path_factory.mktemp("pretraining"), shards=3, per_shard=64, units=True)


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user sees: the command's own default
  return env


def _command(*args: str) -> list[str]:
  return [sys.executable, "-m", "hubert_ecg_jax.cli", *args, "--config.train.progress=false"]


# What TensorFlow prints when it starts, in every command: informational lines, not the error's.
_STARTUP = re.compile(r"^([IW]\d{4} |WARNING: All log messages before absl::InitializeLog)")


def _assert_one_line_error(done: subprocess.CompletedProcess, command: str, expected: str) -> None:
  assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
  assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if not _STARTUP.match(line)]
  assert len(lines) == 1 and lines[0].startswith(f"hubert-ecg-jax {command}: error: {expected}"), (
      done.stderr[-3000:])


def _losses(text: str) -> dict[int, str]:
  return dict((int(step), loss) for step, loss in
              re.findall(r"^\[train\] step (\d+):.* loss ([^,]+),", text, re.MULTILINE))


def test_a_damaged_shard_stops_pretraining_in_one_line_and_the_run_resumes_once_replaced(
    pretraining_data, tmp_path):
  data = pathlib.Path(shutil.copytree(pretraining_data, tmp_path / "data"))
  bad = _shard(data, 3)
  sound = _flip(bad)
  workdir = tmp_path / "run"
  command = _command("pretrain", "demo_pretrain", str(workdir),
                     f"--config.data.train_dir={data / 'records'}",
                     f"--config.data.train_units={data / 'units'}", "--config.data.batch_size=4",
                     "--config.data.shuffle_buffer=4", "--config.train.total_steps=40",
                     "--config.train.log_every=1", "--config.train.checkpoint_every=3")
  failed = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
  _assert_one_line_error(failed, "pretrain", f"{bad}: record {_readable(bad) + 1} of 64 cannot be read")
  kept = _checkpoints(workdir)
  assert kept, failed.stdout[-2000:]  # the damaged record lies past the first checkpoints
  bad.write_bytes(sound)  # replaced from its source
  resumed = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(rf"^resumed from step {kept[-1]} in ", resumed.stdout, re.MULTILINE)
  assert (workdir / "model").is_dir() and _checkpoints(workdir)[-1] == 40
  # Steps both runs took (from the checkpoint to the failure): the same data, the same losses.
  first, second = _losses(failed.stdout), _losses(resumed.stdout)
  assert sorted(second) == list(range(kept[-1] + 1, 41))
  assert all(second[step] == loss for step, loss in first.items() if step > kept[-1])


def _finetuning_data(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  train = _write(root / "train", shards=3, per_shard=32) / "records"
  val = _write(root / "val", shards=1, per_shard=8) / "records"
  return train, val


def _finetune_command(workdir: pathlib.Path, train: pathlib.Path, val: pathlib.Path,
                      *extra: str) -> list[str]:
  return _command("finetune", "finetune_demo", str(workdir), f"--config.data.train={train}",
                  f"--config.data.val={val}", "--config.train.batch_size=4",
                  "--config.train.shuffle_buffer=4", "--config.train.steps=10",
                  "--config.train.eval_every=100", "--config.train.log_every=1", *extra)


def test_a_damaged_shard_stops_finetuning_in_one_line_and_the_run_resumes_once_replaced(tmp_path):
  train, val = _finetuning_data(tmp_path / "data")
  workdir = tmp_path / "run"
  command = _finetune_command(workdir, train, val)
  # A run stopped by its scheduler (it checkpoints and stops) ...
  log = tmp_path / "first.log"
  with open(log, "w") as out:
    first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path))
    started = time.monotonic()
    while "[train] step 2:" not in log.read_text() and first.poll() is None:
      assert time.monotonic() - started < 300, log.read_text()[-3000:]
      time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
  kept = _checkpoints(workdir)
  assert kept and kept[-1] < 10
  # ... whose training data got damaged meanwhile: the rerun stops in one line, before training.
  bad = _shard(train.parent, 3)
  sound = _flip(bad)
  failed = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
  _assert_one_line_error(failed, "finetune", f"{bad}: record {_readable(bad) + 1} of 32 cannot be read")
  assert _checkpoints(workdir) == kept
  bad.write_bytes(sound)
  resumed = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(rf"^resumed from step {kept[-1]} in ", resumed.stdout, re.MULTILINE)
  assert sorted(_losses(resumed.stdout)) == list(range(kept[-1] + 1, 11))
  assert (workdir / "best_model").is_dir()


def _skipped_per_step(text: str) -> dict[int, int]:
  return {int(step): int(count) for step, count in
          re.findall(r"^\[train\] step (\d+):.* skipped_records (\d+)", text, re.MULTILINE)}


def test_with_skipping_pretraining_completes_and_its_metrics_count_the_skipped_records(
    pretraining_data, tmp_path, capsys):
  data = pathlib.Path(shutil.copytree(pretraining_data, tmp_path / "data"))
  bad = _shard(data, 3)
  _flip(bad)
  lost = 64 - _readable(bad)
  steps = (192 - lost) // 8  # about one pass over the readable records
  code = cli.main(["pretrain", "demo_pretrain", str(tmp_path / "run"),
                   f"--config.data.train_dir={data / 'records'}",
                   f"--config.data.train_units={data / 'units'}", "--config.data.skip_corrupted=true",
                   "--config.data.batch_size=8", "--config.data.shuffle_buffer=4",
                   f"--config.train.total_steps={steps}", "--config.train.log_every=5",
                   "--config.train.checkpoint_every=100", "--config.train.progress=false"])
  out = capsys.readouterr().out
  assert code == 0 and (tmp_path / "run" / "model").is_dir(), out[-3000:]
  skipped = _skipped_per_step(out)  # each line: the records skipped since the line before
  assert sorted(skipped) == sorted({1, *range(5, steps + 1, 5), steps})
  assert sum(skipped.values()) == lost, skipped  # the damage lies mid-pass: counted once
  assert out.count(f"skipped {lost} damaged records of {bad} ") == 1


def test_with_skipping_finetuning_completes_and_its_metrics_count_the_skipped_records(tmp_path, capsys):
  train, val = _finetuning_data(tmp_path / "data")
  bad = _shard(train.parent, 3)
  _flip(bad)
  lost = 32 - _readable(bad)
  code = cli.main([*_finetune_command(tmp_path / "run", train, val, "--config.data.skip_corrupted=true",
                                      "--config.train.batch_size=8", "--config.train.log_every=5")[3:]])
  out = capsys.readouterr().out
  assert code == 0 and (tmp_path / "run" / "best_model").is_dir(), out[-3000:]
  skipped = _skipped_per_step(out)
  assert sorted(skipped) == [1, 5, 10]
  assert sum(skipped.values()) == lost, skipped  # 80 records read: about one pass
  assert out.count(f"skipped {lost} damaged records of {bad} ") == 1
