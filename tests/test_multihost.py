"""Multi-host pre-training: 2 processes x 4 CPU devices (gloo, 127.0.0.1) train like 1 process x 8.

Each host reads its own shards and draws its span masks from (seed, host, step), so a 1-process run
of the same command reads other batches and draws other masks: the two cannot be compared as they
are. So the 2-process run records, per host and step, the batch it fed (`_DRIVER`), and a 1-process
run on 8 devices is fed those batches joined into the global ones (host 0's rows, then host 1's, as
the global array orders them). It must log the same loss and gradient norm at every step and end
with the same parameters, up to float32 rounding (about 1e-7: the all-reduce over gloo sums in
another order than one process does). The records show that the hosts split the data (each reads
its own shards, in several batches per epoch) and drew different masks.
"""
from __future__ import annotations

import pathlib
import socket
import sys
from typing import Callable

import jax
import numpy as np

from hubert_ecg_jax.model_dir import load_model

from conftest import (CliRun, cli_env, pretrain_data, tensorboard_scalars, timeout_s,
                      write_tiny_records)

RECORDS = 40  # 4 shards of 10: each host reads 2 (20 records), in batches of 8
GLOBAL_BATCH = 16
STEPS = 6  # 2.4 epochs of each host's records
TIMEOUT_S = 300

# Runs the command line with `make_train_iterator` wrapped: "record" saves each batch a process
# feeds (process{i}-step{n}.npz); "replay" feeds the global batches joined from those files.
_DRIVER = """
import pathlib, sys
import jax
import numpy as np
from hubert_ecg_jax import cli
from hubert_ecg_jax.train import loop

mode, folder = sys.argv[1], pathlib.Path(sys.argv[2])
read = loop.make_train_iterator


class Recorded:
  def __init__(self, batches):
    self.batches, self.step = batches, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.batches)
    self.step += 1
    np.savez(folder / f"process{jax.process_index()}-step{self.step}.npz", **batch)
    return batch

  def save(self, path):
    return self.batches.save(path)

  def restore(self, path):
    self.batches.restore(path)


def replayed(directory, config, units, **options):
  for step in range(1, 10**9):
    parts = [np.load(folder / f"process{i}-step{step}.npz") for i in (0, 1)]
    yield {key: np.concatenate([part[key] for part in parts]) for key in parts[0].files}


loop.make_train_iterator = ((lambda d, c, u, **options: Recorded(read(d, c, u, **options)))
                            if mode == "record" else replayed)
sys.exit(cli.main(sys.argv[3:]))
"""


def _free_port() -> int:
  """A TCP port that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pretrain(cli: Callable[..., CliRun], tmp_path: pathlib.Path, workdir: str, devices: int,
              steps: int, *extra: str, driver: tuple[str, ...] = ()) -> CliRun:
  """`hubert-ecg-jax pretrain` on `devices` CPU devices, through `_DRIVER` if `driver` is given."""
  args = ["pretrain", *extra, "demo_pretrain", str(tmp_path / workdir),
          *pretrain_data(tmp_path / "records"), f"--config.data.batch_size={GLOBAL_BATCH}",
          "--config.data.mask_prob=0.33",
          f"--config.train.total_steps={steps}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", "--config.train.progress=false"]
  program = [sys.executable, str(tmp_path / "driver.py"), *driver] if driver else None
  return cli(args, cli_env(tmp_path, devices), program)


def _finished(runs: list[CliRun]) -> list[str]:
  """Waits for every run; asserts they all succeeded; their outputs."""
  statuses = [run.finish(timeout_s(TIMEOUT_S)) for run in runs]
  for run, status in zip(runs, statuses):
    assert status == 0, run.output[-4000:]
  return [run.output for run in runs]


def _recorded(folder: pathlib.Path, process: int) -> list[dict[str, np.ndarray]]:
  return [dict(np.load(folder / f"process{process}-step{step}.npz"))
          for step in range(1, STEPS + 1)]


def _curves(workdir: pathlib.Path) -> dict[tuple[str, int], list[float]]:
  return {key: values for key, values in tensorboard_scalars(workdir / "tensorboard").items()
          if key[0] in ("train/loss", "train/grad_norm")}


def test_two_processes_train_like_one_on_the_same_global_batches(cli, tmp_path) -> None:
  """6 steps of 2 hosts x 8 records (mask probability 0.33), then the same global batches in one
  process; the 2-process checkpoint then resumes in one process."""
  write_tiny_records(tmp_path / "records", RECORDS, 4)
  (tmp_path / "driver.py").write_text(_DRIVER)
  (tmp_path / "batches").mkdir()
  port = _free_port()
  record = ("record", str(tmp_path / "batches"))
  _finished([_pretrain(cli, tmp_path, "multi", 4, STEPS, f"--coordinator=127.0.0.1:{port}",
                       "--num-processes=2", f"--process-id={i}", driver=record) for i in range(2)])

  hosts = [_recorded(tmp_path / "batches", i) for i in range(2)]
  for i, batches in enumerate(hosts):
    ids = np.concatenate([batch["record_id"] for batch in batches])
    shards = range(i * 10, i * 10 + 10), range(20 + i * 10, 30 + i * 10)  # shards i and i + 2
    assert sorted(ids[:20]) == sorted(f"r{n}" for shard in shards for n in shard)  # one epoch
    assert all(batch["x"].shape[0] == GLOBAL_BATCH // 2 for batch in batches)
  for step, (ours, theirs) in enumerate(zip(*hosts), start=1):
    assert not np.array_equal(ours["mask_time_indices"], theirs["mask_time_indices"]), step
    for masks in (ours["mask_time_indices"], theirs["mask_time_indices"]):
      assert 0.25 < masks.mean() < 0.4  # mask probability 0.33

  multi, (_, multi_params, _) = _curves(tmp_path / "multi"), load_model(tmp_path / "multi" / "model")
  replay = _pretrain(cli, tmp_path, "single", 8, STEPS,
                     driver=("replay", str(tmp_path / "batches")))
  # The 2-process checkpoint resumes in one process: state restored; the per-host data positions
  # (batches of 8 each) cannot continue as one stream of 16, so the stream restarts, with a warning.
  resume = _pretrain(cli, tmp_path, "multi", 8, STEPS + 1)
  _, resumed = _finished([replay, resume])

  single = _curves(tmp_path / "single")
  assert multi.keys() == single.keys()
  assert sorted({step for _, step in single}) == list(range(1, STEPS + 1))
  for key, (value,) in single.items():
    np.testing.assert_allclose(multi[key], [value], rtol=1e-6, err_msg=str(key))
  _, single_params, single_meta = load_model(tmp_path / "single" / "model")
  assert single_meta["step"] == STEPS
  for x, y in zip(jax.tree.leaves(multi_params), jax.tree.leaves(single_params)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)

  assert f"resumed from step {STEPS}" in resumed, resumed[-3000:]
  assert "saved by 2 process(es) and this run has 1" in resumed
  assert f"[train] step {STEPS + 1}:" in resumed
