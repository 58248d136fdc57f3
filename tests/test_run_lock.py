"""A directory is held by one live job; a dead holder (SIGKILL) blocks nobody."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hubert_ecg_jax.run_lock import DirectoryHeldError, hold_directory, lock_path

HOLDER = """
import sys, time
from hubert_ecg_jax.run_lock import hold_directory
with hold_directory(sys.argv[1], "pretrain demo_pretrain run"):
  print("held", flush=True)
  time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
  """A live process holding tmp_path/run, as a running job would."""
  process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")],
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "held"
  yield process
  process.kill()
  process.wait()


def test_second_job_is_refused_with_the_holder(tmp_path, holder):
  started = time.monotonic()
  with pytest.raises(DirectoryHeldError) as refusal:
    with hold_directory(tmp_path / "run", "pretrain"):
      pass
  assert time.monotonic() - started < 2
  message = str(refusal.value)
  assert f"process {holder.pid} on {socket.gethostname()}" in message
  assert "'pretrain demo_pretrain run'" in message and " UTC)" in message
  assert holder.poll() is None  # the first job carries on


def test_killed_holder_does_not_block(tmp_path, holder):
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  assert lock_path(tmp_path / "run").exists()  # the file stays; the lock went with the process
  with hold_directory(tmp_path / "run", "pretrain"):
    assert str(os.getpid()) in lock_path(tmp_path / "run").read_text()
  assert not (tmp_path / "run").exists()  # beside the directory, which it does not create


def test_released_at_the_end_and_on_error(tmp_path):
  with pytest.raises(RuntimeError):
    with hold_directory(tmp_path, "a"):
      raise RuntimeError("the job failed")
  with hold_directory(tmp_path, "b"):
    with pytest.raises(DirectoryHeldError, match="'b'"):
      with hold_directory(tmp_path, "c"):
        pass


def test_processes_other_than_the_first_take_nothing(tmp_path):
  with hold_directory(tmp_path / "run", "pretrain"):
    with hold_directory(tmp_path / "run", "pretrain", take=False):
      pass
  with hold_directory(tmp_path / "other", "pretrain", take=False):
    assert not lock_path(tmp_path / "other").exists()


@pytest.mark.parametrize("argv", [
    ["pretrain", "demo_pretrain", "{run}", "--config.data.train_dir={records}",
     "--config.data.train_units={records}"],
    ["finetune", "finetune_demo", "{run}", "--config.data.train={records}",
     "--config.data.val={records}"],
    ["preprocess", "{records}", "{run}"],
    ["features", "{records}", "{run}", "--feature-set", "stats"],
    ["targets", "{records}", "{run}", "--kmeans", "km.npz", "--feature-set", "stats"],
], ids=lambda argv: argv[0])
def test_commands_refuse_a_held_directory_at_once(tmp_path, holder, capsys, argv):
  from hubert_ecg_jax.cli import main

  run, records = tmp_path / "run", tmp_path / "records"
  started = time.monotonic()
  assert main([arg.format(run=run, records=records) for arg in argv]) == 1
  assert time.monotonic() - started < 20  # before any data is read or model built
  error = capsys.readouterr().err.strip()
  assert error.startswith(f"hubert-ecg-jax {argv[0]}: error: {run} is in use by ")
  assert f"process {holder.pid}" in error and len(error.splitlines()) == 1
  assert holder.poll() is None


def test_a_killed_preprocess_job_resumes_with_the_same_command(tmp_path):
  from hubert_ecg_jax.data.records import read_manifest
  from hubert_ecg_jax.data.synthetic import write_wfdb_folder

  write_wfdb_folder(tmp_path / "raw", 120, seed=0)
  command = [sys.executable, "-m", "hubert_ecg_jax.cli", "preprocess", str(tmp_path / "raw"),
             str(tmp_path / "records"), "--workers", "1", "--records-per-shard", "10", "--quiet"]
  first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while not list((tmp_path / "records").glob("records-*.tfrecord")):  # a shard is finished
    assert first.poll() is None and time.monotonic() < deadline
    time.sleep(0.2)
  first.kill()
  first.wait()
  assert not (tmp_path / "records" / "manifest.json").exists() or not read_manifest(
      tmp_path / "records").complete
  rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr
  assert read_manifest(tmp_path / "records").num_records == 120
