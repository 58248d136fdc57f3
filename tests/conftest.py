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
