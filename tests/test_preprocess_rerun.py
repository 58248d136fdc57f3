"""`hubert-ecg-jax preprocess` rerun into a finished folder with other settings: refused, naming each
setting that differs, and the folder is left as it was (docs/failure-modes.md, Resuming)."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from hubert_ecg_jax.cli import main

BASE = ["--fs", "500", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """A folder of 3 .npy ECGs (10 s at 500 Hz), preprocessed once."""
  root = tmp_path_factory.mktemp("rerun")
  rng = np.random.default_rng(0)
  (root / "src").mkdir()
  for i in range(3):
    np.save(root / "src" / f"ecg{i}.npy", rng.normal(size=(12, 5000)).astype(np.float32))
  assert main(["preprocess", str(root / "src"), str(root / "out"), *BASE]) == 0
  return root / "src", root / "out"


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("options, differs", [
    (["--nan-policy", "interpolate"], "['nan_policy']"),
    (["--fs", "250"], "['fs']"),
    (["--label-start-index", "4"], "['label_start_index']"),
    (["--order", "filter_first", "--nan-policy", "interpolate"], "['nan_policy', 'order']"),
], ids=["nan-policy", "rate", "labels", "two"])
def test_a_rerun_with_other_settings_is_refused(finished, capsys, options, differs) -> None:
  src, out = finished
  before = _files(out)
  capsys.readouterr()
  assert main(["preprocess", str(src), str(out), *BASE, *options]) == 1
  err = capsys.readouterr().err
  assert f"holds the manifest of a different job (differs in {differs})" in err, err
  assert _files(out) == before
  assert main(["preprocess", str(src), str(out), *BASE]) == 0  # the same job: nothing to do
  assert _files(out) == before


def test_a_rerun_with_other_sources_is_refused(finished, tmp_path, capsys) -> None:
  src, out = finished
  other = tmp_path / "src"
  other.mkdir()
  for path in sorted(src.iterdir())[:2]:
    (other / path.name).symlink_to(path)
  capsys.readouterr()
  assert main(["preprocess", str(other), str(out), *BASE]) == 1
  assert "(differs in ['num_sources', 'sources_sha256'])" in capsys.readouterr().err
