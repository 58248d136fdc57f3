"""`verify` finds every damaged shard among sound ones, and nothing in a sound directory (records
and units directories)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hubert_ecg_jax.cli import main
from hubert_ecg_jax.data import records as R
from hubert_ecg_jax.data import units as U
from hubert_ecg_jax.data.synthetic import write_units
from hubert_ecg_jax.data.verify import verify_records


def _write(directory, shards=6, per_shard=3, ids=None):
  rng = np.random.default_rng(0)
  count = shards * per_shard
  ids = ids or [f"rec{i:03d}" for i in range(count)]
  records = [R.StoredRecord(record_id=ids[i], source=f"/raw/{ids[i]}.hea",
                            signal=rng.standard_normal((12, 2500)).astype(np.float32),
                            labels=np.array([i % 2, 1 - i % 2], np.float32), source_fs=500.0)
             for i in range(count)]
  R.write_records(directory, records, ["a", "b"], num_shards=shards)
  return directory


def _shard(directory, index, shards=6):
  return directory / R.shard_file_name(index, shards)


@pytest.fixture
def damaged(tmp_path):
  directory = _write(tmp_path / "records")
  flipped = bytearray(_shard(directory, 1).read_bytes())
  middle = len(flipped) // 2
  flipped[middle:middle + 64] = bytes(b ^ 0xFF for b in flipped[middle:middle + 64])
  _shard(directory, 1).write_bytes(bytes(flipped))
  cut = _shard(directory, 4).read_bytes()
  _shard(directory, 4).write_bytes(cut[:len(cut) * 2 // 3])
  return directory


def test_finds_every_damaged_shard(damaged, capsys):
  checks, problems = verify_records(damaged, workers=2, progress=False)
  assert [check.file for check in checks if check.problem] == [R.shard_file_name(1, 6),
                                                                R.shard_file_name(4, 6)]
  assert "corrupted record at" in checks[1].problem and checks[1].read < 3
  assert checks[4].read < 3 and problems == []
  assert main(["verify", str(damaged), "--workers", "2", "--quiet"]) == 1
  out = capsys.readouterr().out
  assert "2 of 6 shards bad" in out and f"| {R.shard_file_name(1, 6)} |" in out
  assert f"| {R.shard_file_name(0, 6)} |" not in out and "Replace each bad shard" in out


def test_a_sound_directory_passes(tmp_path, capsys):
  directory = _write(tmp_path / "records")
  assert main(["verify", str(directory), "--quiet"]) == 0
  assert "6 shards, 18 records: all sound" in capsys.readouterr().out


def test_manifest_disagreements(tmp_path):
  directory = _write(tmp_path / "records", ids=[f"r{i % 9}" for i in range(18)])  # ids repeat
  manifest = json.loads((directory / R.MANIFEST_NAME).read_text())
  manifest["shards"][2]["num_records"] = 4
  (directory / R.MANIFEST_NAME).write_text(json.dumps(manifest))
  (directory / "records-00009-of-00010.tfrecord").write_bytes(b"")
  checks, problems = verify_records(directory, workers=1, progress=False)
  assert [c.problem for c in checks if c.problem] == ["3 records, the manifest lists 4"]
  assert any("does not list" in p and "records-00009-of-00010.tfrecord" in p for p in problems)
  assert any("9 record ids appear more than once" in p for p in problems)


def test_refuses_an_unfinished_job(tmp_path):
  directory = _write(tmp_path / "records")
  manifest = json.loads((directory / R.MANIFEST_NAME).read_text())
  manifest["complete"] = False
  (directory / R.MANIFEST_NAME).write_text(json.dumps(manifest))
  assert main(["verify", str(directory), "--quiet"]) == 1  # a one-line error, no table


def test_units_directories(tmp_path, capsys):
  directory = _write(tmp_path / "records")
  write_units(directory, tmp_path / "units", lambda i: np.full((2, 93), int(i[-1]) % 7), [7, 9])
  assert main(["verify", str(tmp_path / "units"), "--quiet"]) == 0
  assert "6 shards, 18 records: all sound" in capsys.readouterr().out
  cut = tmp_path / "units" / U.units_file_name(R.shard_file_name(2, 6))
  cut.write_bytes(cut.read_bytes()[:-40])
  write_units(directory, tmp_path / "wide", lambda i: np.full((2, 93), int(i[-1])), [7, 9])
  checks, problems = verify_records(tmp_path / "units", workers=2, progress=False)
  assert [c.file for c in checks if c.problem] == [cut.name] and problems == []
  checks, _ = verify_records(tmp_path / "wide", workers=2, progress=False)
  bad = [c for c in checks if c.problem]  # records ending in 7, 8 or 9 have units >= 7
  assert bad and all("units of codebook 0 outside [0, 7)" in c.problem for c in bad)
