"""A directory is held by one live job; a dead holder (SIGKILL) blocks nobody."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hubert_ecg_jax.run_lock import LOCK_NAME, DirectoryHeldError, hold_directory

HOLDER = """
import sys, time
from hubert_ecg_jax.run_lock import hold_directory
with hold_directory(sys.argv[1], "pretrain demo_pretrain run"):
  print("held", flush=True)
  time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
  """A live process holding tmp_path/run."""
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
  assert (tmp_path / "run" / LOCK_NAME).exists()  # the file stays; the lock went with the process
  with hold_directory(tmp_path / "run", "pretrain"):
    assert str(os.getpid()) in (tmp_path / "run" / LOCK_NAME).read_text()


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
  assert not (tmp_path / "other").exists()
  with hold_directory(tmp_path / "other", "pretrain", take=False):
    assert not (tmp_path / "other").exists()
