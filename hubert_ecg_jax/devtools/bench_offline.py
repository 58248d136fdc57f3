"""Offline-stage benchmark: each stage of the pre-training data path in ECG/s and bytes per ECG.

A stage is a function returning `StageResult` rows; `run_offline_benchmark` runs every stage on one
folder of synthetic records and `format_stage_table` prints the rows. The preprocess stage is timed
beside its work alone (reading and preparing every record on all cores with a plain process pool,
results discarded), so the ratio says how much the job adds to its work.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import pathlib
import shutil
import time
from typing import Any

from hubert_ecg_jax.data.ingest import limit_worker_threads, preprocess_records
from hubert_ecg_jax.data.preprocess import prepare_record
from hubert_ecg_jax.data.readers import find_records, read_record
from hubert_ecg_jax.data.synthetic import write_wfdb_folder

SYNTHETIC_SEED = 0
BASELINE_CHUNKSIZE = 8


@dataclasses.dataclass(frozen=True)
class StageResult:
  """One timed stage: how many ECGs in how many seconds, and what it left on disk."""
  stage: str
  ecgs: int
  seconds: float
  bytes_written: int
  note: str = ""

  @property
  def ecg_per_s(self) -> float:
    return self.ecgs / self.seconds if self.seconds > 0 else math.inf

  @property
  def bytes_per_ecg(self) -> float:
    return self.bytes_written / self.ecgs if self.ecgs else 0.0

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "ecg_per_s": self.ecg_per_s,
            "bytes_per_ecg": self.bytes_per_ecg}


def directory_bytes(directory: pathlib.Path) -> int:
  """Total size of the files under `directory`."""
  return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _synthetic_records(folder: pathlib.Path, num_records: int) -> list[pathlib.Path]:
  """The `.hea` paths of `num_records` synthetic records in `folder`, written unless there."""
  if not folder.exists():
    write_wfdb_folder(folder, num_records, seed=SYNTHETIC_SEED)
  paths = find_records(folder)
  if len(paths) != num_records:
    raise ValueError(f"{folder} holds {len(paths)} records, expected {num_records}: remove it or "
                     "give another work folder")
  return paths


def _read_and_prepare(path: pathlib.Path) -> None:
  record = read_record(path)
  prepare_record(record.signal, record.fs, lead_names=record.lead_names)


def _time_read_and_prepare(paths: list[pathlib.Path], workers: int) -> float:
  """Seconds to read and prepare every record on `workers` spawned processes of one BLAS thread
  each, as `preprocess` runs them (pool start included)."""
  start = time.perf_counter()
  context = multiprocessing.get_context("spawn")
  with context.Pool(workers, initializer=limit_worker_threads) as pool:
    for _ in pool.imap_unordered(_read_and_prepare, paths, chunksize=BASELINE_CHUNKSIZE):
      pass
  return time.perf_counter() - start


def bench_preprocess(work_dir: pathlib.Path, num_records: int, workers: int | None,
                     repeats: int = 1) -> list[StageResult]:
  """Times `preprocess_records` on `num_records` synthetic 10-s 500 Hz WFDB records against reading
  and preparing them alone, the two in turn `repeats` times, keeping each one's best run (other work
  on the machine only slows a run down). Writes `work_dir/wfdb` (untimed) and `work_dir/records`."""
  if num_records < 1 or repeats < 1:
    raise ValueError(
        f"num_records and repeats must be at least 1, found {num_records} and {repeats}")
  workers = workers or os.cpu_count() or 1
  src, out = work_dir / "wfdb", work_dir / "records"
  paths = _synthetic_records(src, num_records)
  baseline_runs, job_runs = [], []
  for _ in range(repeats):
    baseline_runs.append(_time_read_and_prepare(paths, workers))
    shutil.rmtree(out, ignore_errors=True)  # a records folder left by an earlier run is resumed
    start = time.perf_counter()
    manifest = preprocess_records(src, out, workers=workers, show_progress=False)
    job_runs.append(time.perf_counter() - start)
  baseline = StageResult("read + prepare", len(paths), min(baseline_runs), 0,
                         "plain process pool, results discarded")
  ratio = baseline.seconds / min(job_runs)
  job = StageResult("preprocess", manifest.num_records, min(job_runs), directory_bytes(out),
                    f"{ratio:.2f}x the ECG/s of read + prepare; {len(manifest.shards)} shards")
  return [baseline, job]


def run_offline_benchmark(work_dir: pathlib.Path, num_records: int, workers: int | None,
                          repeats: int = 1) -> tuple[list[StageResult], dict[str, Any]]:
  """Every offline stage on the same records; also the machine and its load around the run."""
  load_before = os.getloadavg()[0]
  results = bench_preprocess(work_dir, num_records, workers, repeats)
  machine = {"cpus": os.cpu_count(), "workers": workers or os.cpu_count() or 1,
             "records": num_records, "repeats": repeats, "load_before": load_before,
             "load_after": os.getloadavg()[0]}
  return results, machine


def offline_title(machine: dict[str, Any]) -> str:
  return (f"bench offline: {machine['records']} synthetic 10-s 500 Hz WFDB records, "
          f"{machine['workers']} workers on {machine['cpus']} CPUs, best of {machine['repeats']}, "
          f"load average {machine['load_before']:.2f} before, {machine['load_after']:.2f} after")


def format_stage_table(results: list[StageResult], title: str) -> str:
  """The rows as a text table under `title`."""
  rows = [title, f"{'stage':<16} {'ECGs':>7} {'seconds':>9} {'ECG/s':>9} {'bytes/ECG':>10}  note"]
  for r in results:
    rows.append(f"{r.stage:<16} {r.ecgs:>7d} {r.seconds:>9.2f} {r.ecg_per_s:>9.1f} "
                f"{r.bytes_per_ecg:>10.0f}  {r.note}")
  return "\n".join(rows)
