"""Shared test set-up: 8 host CPU devices and the real sample records."""
import os

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import pathlib
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import pytest

# Files the tests read, shipped in the repository (tests/data/cinc2021/SOURCE.md: CC BY 4.0).
TEST_DATA = pathlib.Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def sample_data_dir() -> pathlib.Path:
  """Folder of the 30 real CinC 2021 12-lead records (WFDB .hea + .mat)."""
  path = TEST_DATA / "cinc2021"
  if len(list(path.glob("*.hea"))) != 30:
    raise FileNotFoundError(f"the 30 sample ECGs are missing from {path}: restore tests/data from git")
  return path


def block_imports(directory: pathlib.Path, names: tuple[str, ...]) -> pathlib.Path:
  """A folder of stand-in packages that raise ImportError: put it first on a subprocess's path to
  run it as if `names` were not installed."""
  for name in names:
    (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / name / "__init__.py").write_text(
        f"raise ImportError('{name} is not installed in this environment')\n")
  return directory


def write_tiny_records(directory: pathlib.Path, count: int, num_shards: int,
                       classes: tuple[str, ...] = ("none",), targets: bool = True,
                       seed: int = 0) -> pathlib.Path:
  """A records directory of `count` random 5-s signals in `num_shards` shards (records in order:
  shard k holds a contiguous block): record i is `r{i}`, labelled one-hot `classes[i % len]`, and
  when `targets` K=100 pre-training units of 93 frames in `units_dir(directory)`. For runs where
  only the mechanics count."""
  import numpy as np

  from hubert_ecg_jax.data import records
  from hubert_ecg_jax.data.synthetic import write_units

  rng = np.random.default_rng(seed)
  stored = [records.StoredRecord(
      record_id=f"r{i}", source=f"r{i}.hea", source_fs=500.0,
      labels=np.eye(len(classes), dtype=np.float32)[i % len(classes)],
      signal=rng.normal(size=(12, 2500)).astype(np.float32)) for i in range(count)]
  records.write_records(directory, stored, classes, num_shards=num_shards)
  if targets:
    units = {f"r{i}": rng.integers(0, 100, (1, 93)) for i in range(count)}
    write_units(directory, units_dir(directory), units.__getitem__, [100])
  return directory


def units_dir(records_dir: pathlib.Path) -> pathlib.Path:
  """Where `write_tiny_records` puts the records' units: beside them."""
  return records_dir.with_name(records_dir.name + "_units")


def pretrain_data(records_dir: pathlib.Path) -> list[str]:
  """The `pretrain` overrides naming tiny records and their units."""
  return [f"--config.data.train_dir={records_dir}",
          f"--config.data.train_units={units_dir(records_dir)}"]


def timeout_s(seconds: float) -> float:
  """A hang guard: `seconds` times HUBERT_ECG_JAX_TEST_TIMEOUT_SCALE (default 1; raise it on slow
  machines)."""
  return seconds * float(os.environ.get("HUBERT_ECG_JAX_TEST_TIMEOUT_SCALE", "1"))


def cli_env(tmp: pathlib.Path, devices: int, **extra: str) -> dict[str, str]:
  """Environment of a command-line subprocess on `devices` CPU devices: unbuffered output, its
  temporary files under `tmp/tmp`, compiled steps cached in `tmp/jax-cache` (restarts reuse them)."""
  (tmp / "tmp").mkdir(parents=True, exist_ok=True)
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
              TMPDIR=str(tmp / "tmp"), JAX_COMPILATION_CACHE_DIR=str(tmp / "jax-cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", **extra)


class CliRun:
  """`python -m hubert_ecg_jax.cli ARGS` (or `program ARGS`) in a subprocess. A thread reads its
  output (stdout and stderr) as it comes, so a test waits for a line instead of sleeping, and a
  full pipe never blocks the process. Start it through the `cli` fixture, which kills leftovers."""

  def __init__(self, args: list[str], env: dict[str, str], program: list[str] | None = None):
    command = [*(program or [sys.executable, "-m", "hubert_ecg_jax.cli"]), *args]
    self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._ended = False
    self._changed = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.process.stdout:
      with self._changed:
        self.lines.append(line.rstrip("\n"))
        self._changed.notify_all()
    with self._changed:
      self._ended = True
      self._changed.notify_all()

  @property
  def output(self) -> str:
    return "\n".join(self.lines)

  def _fail(self, what: str) -> None:
    self.kill()
    raise AssertionError(f"{what}; the output ends:\n{self.output[-3000:]}")

  def wait_for(self, pattern: str, timeout: float) -> re.Match:
    """The first output line matching `pattern`, once printed; fails if the process ends first or
    nothing matches within `timeout` seconds (0: among the lines printed already)."""
    regex, seen, deadline = re.compile(pattern), 0, time.monotonic() + timeout
    with self._changed:
      while True:
        for line in self.lines[seen:]:
          if match := regex.search(line):
            return match
        seen = len(self.lines)
        if self._ended or time.monotonic() >= deadline:
          self._fail(f"no line matching {pattern!r} in {timeout:.0f} s (ended: {self._ended})")
        self._changed.wait(deadline - time.monotonic())

  def wait_for_file(self, path: pathlib.Path, timeout: float) -> str:
    """The text of `path` once it exists (a test hook's marker); fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
      if self.process.poll() is not None or time.monotonic() >= deadline:
        self._fail(f"no {path} in {timeout:.0f} s (exit status {self.process.poll()})")
      time.sleep(0.02)
    return path.read_text()

  def finish(self, timeout: float) -> int:
    """The exit status, once the process ends and its output is read; kills it after `timeout` s."""
    try:
      self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self._fail(f"still running after {timeout:.0f} s")
    self._reader.join()
    return self.process.returncode

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()


@pytest.fixture
def cli() -> Iterator[Callable[..., CliRun]]:
  """Starts `CliRun`s (same arguments); kills those still running when the test ends."""
  runs: list[CliRun] = []

  def start(*args: Any, **kwargs: Any) -> CliRun:
    runs.append(CliRun(*args, **kwargs))
    return runs[-1]

  yield start
  for run in runs:
    run.kill()


def tensorboard_scalars(directory: pathlib.Path) -> dict[tuple[str, int], list[float]]:
  """(tag, step) -> the values (float32, as stored) of the TensorBoard event files in `directory`."""
  from hubert_ecg_jax.data.records import import_tensorflow

  tf = import_tensorflow()
  found: dict[tuple[str, int], list[float]] = {}
  for path in sorted(directory.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        found.setdefault((value.tag, event.step), []).append(value.simple_value)
  return found


def assert_same_tree(a: Any, b: Any) -> None:
  """Equal pytrees, bit for bit."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Counter:
  """A resumable data source position with save(path)/restore(path), for `DataPosition`."""

  def __init__(self, position: int = 0):
    self.position = position

  def save(self, path: str) -> None:
    pathlib.Path(path).write_text(json.dumps(self.position))

  def restore(self, path: str) -> None:
    self.position = json.loads(pathlib.Path(path).read_text())
