"""Multi-host pre-training: 2 processes x 4 CPU devices (gloo) train like 1 process x 8 devices."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from hubert_ecg_jax.model_dir import load_model

RECORDS = 16  # 2 shards of 8: with a global batch of 16 every step sees every record once
TIMEOUT_S = 180


def _free_port() -> int:
  """A TCP port that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_records(directory: pathlib.Path) -> None:
  """Tiny records in 2 shard files (one per process), and their K=100 units beside them."""
  from hubert_ecg_jax.data import records
  from hubert_ecg_jax.data.synthetic import write_units

  rng = np.random.default_rng(0)
  stored = [records.StoredRecord(
      record_id=f"r{i}", source=f"r{i}.hea", labels=np.zeros(1, np.float32), source_fs=500.0,
      signal=rng.normal(size=(12, 2500)).astype(np.float32)) for i in range(RECORDS)]
  records.write_records(directory, stored, ["none"], num_shards=2)
  write_units(directory, _units_dir(directory), lambda record_id: rng.integers(0, 100, (1, 93)), [100])


def _units_dir(records_dir: pathlib.Path) -> pathlib.Path:
  return records_dir.with_name(records_dir.name + ".units")


def _pretrain(workdir: pathlib.Path, records_dir: pathlib.Path, devices: int, steps: int,
              *extra: str) -> subprocess.Popen:
  """Starts `hubert-ecg-jax pretrain demo_pretrain` in a subprocess with `devices` CPU devices."""
  # mask_prob 1 masks every frame, so masks do not depend on how batches split over hosts; the
  # global batch of 16 is every record once, so batch contents do not depend on it either.
  overrides = [f"--config.data.train_dir={records_dir}",
               f"--config.data.train_units={_units_dir(records_dir)}", "--config.data.batch_size=16",
               "--config.data.mask_prob=1.0", "--config.model.dropout=0.0",
               f"--config.train.total_steps={steps}", "--config.train.checkpoint_every=1",
               "--config.train.progress=false"]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  # Output goes to a file: a full pipe would block one process and, with it, the collectives.
  log = open(workdir.parent / f"{workdir.name}-{len(list(workdir.parent.glob('*.log')))}.log", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "hubert_ecg_jax.cli", "pretrain", *extra, "demo_pretrain", str(workdir),
       *overrides], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log = log  # type: ignore[attr-defined]
  return proc


def _wait_all(procs: list[subprocess.Popen]) -> list[str]:
  """Waits for every process (with a timeout), kills leftovers, asserts they all succeeded."""
  outputs = []
  try:
    for proc in procs:
      proc.wait(timeout=TIMEOUT_S)
      proc.log.seek(0)
      outputs.append(proc.log.read())
      proc.log.close()
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-4000:]
  return outputs


def _assert_same_params(a: dict, b: dict) -> None:
  paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
  paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
  assert paths_a == paths_b
  for path, x, y in zip(paths_a, leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path) -> None:
  records_dir = tmp_path / "records"
  _write_records(records_dir)
  port = _free_port()
  multi = [_pretrain(tmp_path / "multi", records_dir, 4, 3, f"--coordinator=127.0.0.1:{port}",
                     "--num-processes=2", f"--process-id={i}") for i in range(2)]
  single = _pretrain(tmp_path / "single", records_dir, 8, 3)
  outputs = _wait_all([*multi, single])
  assert all("[train] step 3:" in out for out in outputs[::2]), outputs[0][-2000:]

  _, multi_params, multi_meta = load_model(tmp_path / "multi" / "model")
  _, single_params, single_meta = load_model(tmp_path / "single" / "model")
  assert multi_meta["step"] == single_meta["step"] == 3
  _assert_same_params(multi_params, single_params)

  # The model the 2-process run exported restores in this single process (load_model above), and
  # its training checkpoint resumes in one process: state restored, the per-host data positions
  # (batches of 8 each) cannot continue as one stream of 16, so the stream restarts, with a warning.
  (resumed,) = _wait_all([_pretrain(tmp_path / "multi", records_dir, 8, 4)])
  assert "resumed from step 3" in resumed, resumed[-3000:]
  assert "saved by 2 process(es) and this run has 1" in resumed
  assert "[train] step 4:" in resumed
  _, _, resumed_meta = load_model(tmp_path / "multi" / "model")
  assert resumed_meta["step"] == 4
