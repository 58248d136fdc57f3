"""Offline-stage benchmark: each stage of the pre-training data path in ECG/s and bytes per ECG.

A stage is a function returning `StageResult` rows; `run_offline_benchmark` runs every stage on one
folder of synthetic records and `format_stage_table` prints the rows. The preprocess stage is timed
beside its work alone (reading and preparing every record on all cores with a plain process pool,
results discarded), so the ratio says how much the job adds to its work. The targets' stages follow
on the records it wrote: the k-means sample and fit, the units pass of iteration 1, its host side
alone, and the units pass of a model layer.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import multiprocessing
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, HubertECGConfig
from hubert_ecg_jax.data.ingest import limit_worker_threads, preprocess_records
from hubert_ecg_jax.data.preprocess import model_inputs, prepare_record
from hubert_ecg_jax.data.readers import find_records, read_record
from hubert_ecg_jax.data.records import iterate_records, read_manifest, write_records
from hubert_ecg_jax.data.synthetic import write_wfdb_folder
from hubert_ecg_jax.inference import hidden_state_features
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.model_dir import save_model
from hubert_ecg_jax.targets.features import num_frames
from hubert_ecg_jax.targets.kmeans import KMeansConfig, KMeansModel, fit_kmeans
from hubert_ecg_jax.targets.stream import SAMPLE_FILE, handmade_features, sample_features, write_units

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


def _zero_features(x: np.ndarray, mask: np.ndarray, dim: int) -> np.ndarray:
  """Features of nothing: the units pass's host side alone (read, crop, decimate, assign)."""
  return np.zeros((len(x), num_frames(MODEL_INPUT_LENGTH), dim), np.float32)


def _timed(work: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  result = work()
  return result, time.perf_counter() - start


def bench_targets(records_dir: pathlib.Path, work_dir: pathlib.Path, workers: int,
                  model_size: str = "base", model_records: int = 64,
                  sample_frames: int = 100_000) -> list[StageResult]:
  """The k-means targets' stages on a records directory: the feature sample and the k-means fit
  (one-offs), the units pass of iteration 1 (hand-made "mixed" features on `workers` processes)
  and its host side alone (one process, features skipped), and the units pass of a model layer
  (a randomly initialised `model_size` model's middle layer on every local device, over the first
  `model_records` records)."""
  num_records = read_manifest(records_dir).num_records
  features, description = handmade_features("mixed")
  rows = []
  sample_dir = work_dir / "sample"
  summary, seconds = _timed(lambda: sample_features(
      records_dir, sample_dir, features, description, frames=sample_frames, overwrite=True,
      show_progress=False))
  rows.append(StageResult("k-means sample", summary["records_drawn"], seconds,
                          directory_bytes(sample_dir),
                          f"one-off: {summary['frames']} frames of mixed features"))
  sample = np.load(sample_dir / SAMPLE_FILE)
  model, seconds = _timed(lambda: fit_kmeans(sample, KMeansConfig(k=100)))
  kmeans_path = work_dir / "kmeans_k100.npz"
  model.save(kmeans_path)
  rows.append(StageResult("k-means fit", summary["records_drawn"], seconds,
                          kmeans_path.stat().st_size, f"one-off: K 100 on {len(sample)} frames"))
  host_side = functools.partial(_zero_features, dim=model.dim)
  for name, folder, fn, stage_workers in (
      ("units, iteration 1", "units_it1", features, workers),
      ("units, host side", "units_host", host_side, 1)):
    units_dir = work_dir / folder
    shutil.rmtree(units_dir, ignore_errors=True)  # a rerun in the same work folder times it again
    _, seconds = _timed(lambda: write_units(records_dir, units_dir, fn, description, [kmeans_path],
                                            workers=stage_workers, show_progress=False))
    rows.append(StageResult(name, num_records, seconds, directory_bytes(units_dir),
                            f"{stage_workers} process(es)" + (", features skipped (zeros)"
                                                              if fn is host_side else ", mixed")))
  rows.append(_bench_model_units(records_dir, work_dir, model_size, model_records))
  return rows


def _bench_model_units(records_dir: pathlib.Path, work_dir: pathlib.Path, model_size: str,
                       model_records: int) -> StageResult:
  """The units pass over a model layer's hidden states, on a subset of the records."""
  subset, units_dir = work_dir / "model_records", work_dir / "units_model"
  for folder in (subset, units_dir):
    shutil.rmtree(folder, ignore_errors=True)
  write_records(subset, itertools.islice(iterate_records(records_dir), model_records),
                read_manifest(records_dir).label_names)
  config = HubertECGConfig.preset(model_size)
  params = HubertECG(config).init(jax.random.key(0), jnp.zeros((1, MODEL_INPUT_LENGTH)))["params"]
  save_model(work_dir / "model", config, params)
  layer = config.num_hidden_layers // 2
  features, description = hidden_state_features(work_dir / "model", layer)
  centres = np.random.default_rng(0).normal(size=(500, config.hidden_size)).astype(np.float32)
  KMeansModel(centres, True, np.ones(500, np.int64), 0.0, (), KMeansConfig(k=500)).save(
      work_dir / "kmeans_k500.npz")
  features(*model_inputs(np.zeros((1, 12, 2500), np.float32)))  # compile outside the timing
  _, seconds = _timed(lambda: write_units(subset, units_dir, features, description,
                                          [work_dir / "kmeans_k500.npz"], show_progress=False))
  count = read_manifest(subset).num_records
  return StageResult(f"units, {model_size} L{layer}", count, seconds,
                     directory_bytes(units_dir), f"{jax.local_device_count()} {jax.default_backend()} "
                     "device(s)")


def run_offline_benchmark(work_dir: pathlib.Path, num_records: int, workers: int | None,
                          repeats: int = 1, model_size: str = "base", model_records: int = 64
                          ) -> tuple[list[StageResult], dict[str, Any]]:
  """Every offline stage on the same records; also the machine and its load around the run."""
  load_before = os.getloadavg()[0]
  results = bench_preprocess(work_dir, num_records, workers, repeats)
  results += bench_targets(work_dir / "records", work_dir, workers or os.cpu_count() or 1,
                           model_size, min(model_records, num_records))
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
  rows = [title, f"{'stage':<18} {'ECGs':>7} {'seconds':>9} {'ECG/s':>9} {'bytes/ECG':>10}  note"]
  for r in results:
    rows.append(f"{r.stage:<18} {r.ecgs:>7d} {r.seconds:>9.2f} {r.ecg_per_s:>9.1f} "
                f"{r.bytes_per_ecg:>10.0f}  {r.note}")
  return "\n".join(rows)
