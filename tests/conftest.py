"""Shared test set-up: 8 host CPU devices and the real sample records."""
import os

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

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

