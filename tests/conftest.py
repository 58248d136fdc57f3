"""Shared test set-up: 8 host CPU devices and the real sample records."""
import os

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

_DEFAULT_SAMPLE_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cinc2021"


@pytest.fixture(scope="session")
def sample_data_dir() -> pathlib.Path:
  """Folder of the 30 real CinC 2021 12-lead records (WFDB .hea + .mat)."""
  path = pathlib.Path(os.environ.get("HUBERT_ECG_SAMPLE_DATA", _DEFAULT_SAMPLE_DATA))
  if not any(path.glob("*.hea")):
    raise FileNotFoundError(
        f"sample ECGs not found in {path}: set HUBERT_ECG_SAMPLE_DATA to the cinc2021 folder")
  return path
