"""The accelerator check runs end to end on the CPU, in an environment without TensorFlow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hubert_ecg_jax.devtools.device_check import QUICK_SWEEP, parse_sweep

from conftest import block_imports

# What the GPU image lacks: the check must not import any of them.
ABSENT_ON_THE_GPU_IMAGE = ("tensorflow", "tensorflow_datasets", "wfdb", "ml_collections",
                           "tensorboardX")


def test_quick_check_without_tensorflow(tmp_path):
  blockers = block_imports(tmp_path / "blocked", ABSENT_ON_THE_GPU_IMAGE)
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one CPU device
  env["PYTHONPATH"] = str(blockers)
  out = tmp_path / "device_check.json"
  result = subprocess.run([sys.executable, "-m", "hubert_ecg_jax.cli", "bench", "device", "--quick",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr
  record = json.loads(out.read_text())
  assert record["environment"]["platform"] == "cpu"
  assert record["environment"]["versions"]["jax"]
  assert record["parity"]["fp32_max_abs_diff"] <= 1e-4
  assert 0 < record["parity"]["bf16_relative_error"] <= 2e-2
  rows = record["throughput"]
  assert [(r["size"], r["dtype"], r["mode"], r["batch"]) for r in rows] == [
      ("tiny", "bf16", "train", 4), ("tiny", "bf16", "train", 8), ("tiny", "fp32", "forward", 8)]
  for row in rows:
    assert row["status"] == "ok" and row["jax_ecg_per_s"] > 0 and row["torch_ecg_per_s"] > 0
    assert row["compile_s"] > 0 and row["device_bytes"] > 0
  run = record["pretraining"]
  assert run["last_loss"] < 0.8 * run["first_loss"]  # the units are learnt
  assert run["restore_identical"]
  assert record["kmeans"]["seconds"] > 0
  assert "| tiny | bf16 | train | 8 |" in result.stdout and "identical" in result.stdout


def test_sweep_lines():
  assert len(parse_sweep(QUICK_SWEEP)) == 3
  with pytest.raises(ValueError, match="SIZE DTYPE MODE BATCHES"):
    parse_sweep(("base bf16 train",))
  with pytest.raises(ValueError, match="bf16 or fp32"):
    parse_sweep(("base fp16 train 8",))
  with pytest.raises(ValueError, match="unknown model size"):
    parse_sweep(("huge bf16 train 8",))
  with pytest.raises(ValueError, match="comma-separated integers"):
    parse_sweep(("base bf16 train 8;16",))
