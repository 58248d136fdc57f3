"""`bench offline` reports its rows, table and JSON as the issues quote them (not a timing test)."""
from __future__ import annotations

import json
import pathlib

import pytest

from hubert_ecg_jax.cli import main as cli_main
from hubert_ecg_jax.data import records as R
from hubert_ecg_jax.devtools.bench_offline import StageResult, bench_preprocess, format_stage_table

NUM_RECORDS = 40
STAGES = ["read + prepare", "preprocess"]
TARGET_STAGES = ["k-means sample", "k-means fit", "units, iteration 1", "units, host side",
                 "units, tiny L1"]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("bench_offline")


def test_preprocess_stage_rows_and_table(work_dir):
  results = bench_preprocess(work_dir, NUM_RECORDS, workers=2)
  assert [r.stage for r in results] == STAGES
  assert all(r.ecgs == NUM_RECORDS and r.seconds > 0 and r.ecg_per_s > 0 for r in results)
  records = work_dir / "records"
  on_disk = sum(path.stat().st_size for path in records.iterdir())
  assert results[0].bytes_written == 0 and results[1].bytes_written == on_disk
  assert results[1].bytes_per_ecg == on_disk / NUM_RECORDS
  assert R.read_manifest(records).num_records == NUM_RECORDS
  assert "x the ECG/s of read + prepare" in results[1].note

  lines = format_stage_table(results, "the title").splitlines()
  assert lines[0] == "the title" and len(lines) == 2 + len(STAGES)
  assert lines[1].split()[:5] == ["stage", "ECGs", "seconds", "ECG/s", "bytes/ECG"]
  assert [line.startswith(stage) for line, stage in zip(lines[2:], STAGES)] == [True, True]


def test_stage_result_rates():
  result = StageResult("stage", ecgs=10, seconds=2.0, bytes_written=500)
  assert result.ecg_per_s == 5.0 and result.bytes_per_ecg == 50.0
  assert result.to_dict() == {"stage": "stage", "ecgs": 10, "seconds": 2.0, "bytes_written": 500,
                              "note": "", "ecg_per_s": 5.0, "bytes_per_ecg": 50.0}


def test_command_json_reuses_the_work_folder(work_dir, capsys):
  # The folder holds the synthetic records of the test above: they are reused, not written again.
  written = {path: path.stat().st_mtime_ns for path in (work_dir / "wfdb").iterdir()}
  assert cli_main(["bench", "offline", "--records", str(NUM_RECORDS), "--workers", "1",
                   "--repeats", "2", "--work-dir", str(work_dir), "--size", "tiny",
                   "--model-records", "8", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert {path: path.stat().st_mtime_ns for path in (work_dir / "wfdb").iterdir()} == written
  assert report["records"] == NUM_RECORDS and report["workers"] == 1 and report["repeats"] == 2
  assert report["cpus"] >= 1
  assert {"load_before", "load_after"} <= set(report)
  assert [stage["stage"] for stage in report["stages"]] == STAGES + TARGET_STAGES
  for stage in report["stages"]:
    assert set(stage) == {"stage", "ecgs", "seconds", "bytes_written", "note", "ecg_per_s",
                          "bytes_per_ecg"}
  records = work_dir / "records"
  assert report["stages"][1]["bytes_written"] == sum(p.stat().st_size for p in records.iterdir())
  # The units passes write only the units: under 1 KB per ECG, the units files and their manifest.
  by_name = {stage["stage"]: stage for stage in report["stages"]}
  units = work_dir / "units_it1"
  assert by_name["units, iteration 1"]["bytes_written"] == sum(
      p.stat().st_size for p in units.iterdir())
  assert by_name["units, iteration 1"]["ecgs"] == NUM_RECORDS
  assert 0 < by_name["units, iteration 1"]["bytes_per_ecg"] < 1024
  assert by_name["units, tiny L1"]["ecgs"] == 8


def test_command_refuses_a_work_folder_of_other_records(work_dir, capsys):
  assert cli_main(["bench", "offline", "--records", "5", "--work-dir", str(work_dir)]) == 1
  assert f"holds {NUM_RECORDS} records, expected 5" in capsys.readouterr().err
