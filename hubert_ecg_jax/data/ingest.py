"""Ingestion, the library of `hubert-ecg-jax preprocess` (its help tells the whole job).

List the records of a source (`list_sources`), assign them to shards by a fixed-seed permutation
(`shard_assignment`), prepare and serialize each in worker processes (`encode_task`) and write the
shards atomically, the manifest after each; a rerun of the same job resumes (`preprocess_records`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import multiprocessing
import os
import pathlib
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data.labels import MultiLabelEncoder, read_split_csv, snomed_codes_from_header
from hubert_ecg_jax.data.preprocess import prepare_record, zeroed_leads
from hubert_ecg_jax.data.readers import (HDF5_EXTENSIONS, code15_exam_ids, find_hdf5_files,
                                         find_records, read_code15_exam, read_record)
from hubert_ecg_jax.files import AnyPath, as_path
from hubert_ecg_jax.progress import progress_bar
from hubert_ecg_jax.run_lock import holds_directory

ASSIGNMENT_SEED = 0
DEFAULT_RECORDS_PER_SHARD = 512
_RECORD_SUFFIXES = (".hea", ".npy", ".mat", ".dat", ".csv")


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """One record to prepare: its file, its unique id, (from a labels CSV) labels and metadata, and
  for an exam of a CODE-15 HDF5 file its row there."""
  path: str
  record_id: str
  csv_labels: tuple[float, ...] | None = None
  csv_metadata: tuple[tuple[str, str], ...] = ()
  row: int | None = None

  @property
  def key(self) -> str:
    """The name matched with labels CSV rows: the file name without extensions, or the exam id."""
    return record_key(self.path) if self.row is None else pathlib.PurePath(self.record_id).name

  @property
  def location(self) -> str:
    """Where the record is: its file, with `[row]` for an exam of an HDF5 file."""
    return self.path if self.row is None else f"{self.path}[{self.row}]"


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  order: str = "resample_first"
  nan_policy: str = "refuse"
  fs: float | None = None
  label_source: str = "dx"
  label_names: tuple[str, ...] = ()
  missing_leads: str = "refuse"


def record_key(name: str) -> str:
  """'dir/HR00009.hea.npy' -> 'HR00009': the name used to match records with CSV rows."""
  name = pathlib.PurePath(name).name
  while pathlib.PurePath(name).suffix.lower() in _RECORD_SUFFIXES:
    name = pathlib.PurePath(name).stem
  return name


def _sex_code(value: Any) -> int:
  """'Male'/'M' -> 1, 'Female'/'F' -> 0, anything else -> -1 (numeric codes differ between datasets)."""
  text = str(value or "").strip().lower()
  return {"male": records_lib.SEX_MALE, "m": records_lib.SEX_MALE,
          "female": records_lib.SEX_FEMALE, "f": records_lib.SEX_FEMALE}.get(text, records_lib.SEX_UNKNOWN)


def _age(value: Any) -> float:
  try:
    age = float(value)
  except (TypeError, ValueError):
    return math.nan
  return age if math.isfinite(age) else math.nan


def csv_sources(path: pathlib.Path, label_start_index: int, root: pathlib.Path | None = None
                ) -> tuple[list[RecordSource], tuple[str, ...]]:
  """Rows of a split CSV as sources (file names relative to `root`, default the CSV's folder,
  unless absolute) and the label names."""
  table = read_split_csv(path, label_start_index=label_start_index)
  sources = []
  for row, filename in enumerate(table.filenames):
    file_path = pathlib.Path(filename)
    file_path = file_path if file_path.is_absolute() else (root or path.parent) / file_path
    metadata = tuple((name, str(values[row])) for name, values in table.metadata.items())
    sources.append(RecordSource(str(file_path), record_key(filename),
                                tuple(float(v) for v in table.labels[row]), metadata))
  return sources, table.label_names


def _hdf5_sources(path: pathlib.Path, root: pathlib.Path) -> list[RecordSource]:
  """One source per exam of a CODE-15 HDF5 file, id '<file under root, no suffix>/<exam_id>'."""
  name = path.relative_to(root).with_suffix("").as_posix()
  return [RecordSource(str(path), f"{name}/{exam_id}", row=row)
          for row, exam_id in enumerate(code15_exam_ids(path))]


def list_sources(src: pathlib.Path, labels_csv: pathlib.Path | None, label_start_index: int,
                 label_source: str) -> tuple[list[RecordSource], tuple[str, ...]]:
  """The records of a job and, for CSV labels, the label names (dx label names come later)."""
  label_names: tuple[str, ...] = ()
  if src.is_file() and src.suffix.lower() == ".csv":
    sources, label_names = csv_sources(src, label_start_index)
  elif src.is_file() and src.suffix.lower() in HDF5_EXTENSIONS:
    sources = _hdf5_sources(src, src.parent)
  elif src.is_dir():
    sources = [RecordSource(str(path), path.relative_to(src).with_suffix("").as_posix())
               for path in find_records(src)]
    sources += [source for path in find_hdf5_files(src) for source in _hdf5_sources(path, src)]
  else:
    raise FileNotFoundError(
        f"SRC {src}: expected a folder of records, a CODE-15 HDF5 file or a CSV listing records")
  if not sources:
    raise ValueError(f"no records found in {src} (looked for .hea, .npy, .hdf5 and .h5 files)")
  duplicates = sorted(k for k, n in Counter(s.record_id for s in sources).items() if n > 1)
  if duplicates:
    raise ValueError(f"record ids must be unique; {len(duplicates)} repeat, e.g. {duplicates[:3]}")
  if labels_csv is not None:
    rows, label_names = csv_sources(labels_csv, label_start_index)
    by_key = {}
    for row in rows:
      if row.record_id in by_key:
        raise ValueError(f"{labels_csv}: record {row.record_id!r} has more than one row")
      by_key[row.record_id] = row
    sources = [dataclasses.replace(s, csv_labels=by_key[key].csv_labels,
                                   csv_metadata=by_key[key].csv_metadata)
               if (key := s.key) in by_key else s for s in sources]
  if label_source == "csv" and not label_names:
    raise ValueError("--label-source csv needs label columns: pass --labels CSV or a CSV as SRC")
  return sorted(sources, key=lambda s: s.record_id), label_names


def shard_assignment(num_records: int, num_shards: int) -> list[np.ndarray]:
  """Record indices of each shard: a fixed-seed permutation cut into near-equal contiguous blocks."""
  order = np.random.default_rng(ASSIGNMENT_SEED).permutation(num_records)
  bounds = [num_records * i // num_shards for i in range(num_shards + 1)]
  return [order[bounds[i]:bounds[i + 1]] for i in range(num_shards)]


def _dx_codes(source: RecordSource) -> tuple[str, ...]:
  if not source.path.lower().endswith(".hea"):
    return ()
  try:
    return snomed_codes_from_header(source.path)
  except (OSError, ValueError):
    return ()  # reported with its reason when the record itself is read


def prepare_source(source: RecordSource, settings: PrepareSettings
                   ) -> records_lib.StoredRecord | tuple[str, str]:
  """Reads and prepares one record; returns the record, or (location, reason) when it is bad."""
  try:
    record = (read_record(source.path, fs=settings.fs) if source.row is None
              else read_code15_exam(source.path, source.row))
    signal = prepare_record(record.signal, record.fs, lead_names=record.lead_names,
                            order=settings.order, nan_policy=settings.nan_policy,
                            missing_leads=settings.missing_leads)
    if settings.label_source == "csv":
      if source.csv_labels is None:
        raise ValueError("no row for this record in the labels CSV")
      labels = np.asarray(source.csv_labels, np.float32)
    else:
      labels = MultiLabelEncoder(settings.label_names).encode(record.labels)
    metadata = dict(record.metadata)
    metadata.update(dict(source.csv_metadata))
    return records_lib.StoredRecord(
        record_id=source.record_id, source=source.location, signal=signal, labels=labels,
        source_fs=float(record.fs), age=_age(metadata.get("age")), sex=_sex_code(metadata.get("sex")))
  except Exception as error:  # a bad record must not stop the job: it is reported instead
    return source.location, f"{type(error).__name__}: {error}"


def limit_worker_threads() -> None:
  """Pool initializer: one BLAS thread per worker, the pool having a worker per core. With a BLAS
  thread per core in every worker, the small solve in each `filtfilt` (`lfilter_zi`) sets them
  spinning against each other: 0.2 ms with one thread, up to 160 ms measured with a thread per
  core (two workers on two busy cores)."""
  threadpool_limits(1)


def prepare_task(task: tuple[RecordSource, PrepareSettings]
                  ) -> records_lib.StoredRecord | tuple[str, str]:
  return prepare_source(*task)


@dataclasses.dataclass(frozen=True)
class EncodedRecord:
  """A prepared record as its serialized example, with what the manifest keeps of it."""
  record_id: str
  source_fs: float
  zeroed_leads: tuple[str, ...]  # leads entered as zeros (missing_leads "zero")
  example: bytes


def encode_task(task: tuple[RecordSource, PrepareSettings]) -> EncodedRecord | tuple[str, str]:
  """`prepare_task`, then serialized in the worker, so that the parent only writes bytes."""
  result = prepare_task(task)
  if isinstance(result, tuple):
    return result
  zeroed = zeroed_leads(result.signal) if task[1].missing_leads == "zero" else []
  return EncodedRecord(result.record_id, result.source_fs, tuple(zeroed),
                       records_lib.encode_example(result))


def file_digest(path: AnyPath) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _job_fingerprint(sources: Sequence[RecordSource], settings: PrepareSettings, num_shards: int,
                     labels_csv: pathlib.Path | None, label_start_index: int) -> dict[str, Any]:
  listing = hashlib.sha256("\n".join(f"{s.record_id}\t{s.path}" for s in sources).encode())
  return {
      "num_sources": len(sources), "sources_sha256": listing.hexdigest(), "num_shards": num_shards,
      "order": settings.order, "nan_policy": settings.nan_policy, "fs": settings.fs,
      "label_source": settings.label_source, "label_start_index": label_start_index,
      "labels_csv_sha256": file_digest(labels_csv) if labels_csv else None,
      # only when asked, so that directories written before the option keep their fingerprint
      **({"missing_leads": settings.missing_leads} if settings.missing_leads != "refuse" else {}),
  }


def _prepare_out(out: AnyPath, job: dict[str, Any]) -> records_lib.RecordsManifest | None:
  """Checks OUT is a writable folder; returns the manifest of the same job to resume, if any."""
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"OUT {out} exists and is not a folder")
  out.mkdir(parents=True, exist_ok=True)
  probe = out / f".write-test-{os.getpid()}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as error:
    raise PermissionError(f"OUT {out} is not writable ({error})") from error
  if not (out / records_lib.MANIFEST_NAME).exists():
    return None
  manifest = records_lib.read_manifest(out)
  if manifest.job != job:
    changed = sorted(k for k in set(job) | set(manifest.job) if job.get(k) != manifest.job.get(k))
    raise FileExistsError(
        f"OUT {out} holds the manifest of a different job (differs in {changed}); choose an empty "
        "folder or rerun with the arguments of that job to resume it")
  return manifest


@holds_directory("out")
def preprocess_records(src: str | os.PathLike, out: str | os.PathLike, *,
                       labels_csv: str | os.PathLike | None = None, label_source: str | None = None,
                       label_start_index: int = 3, num_shards: int | None = None,
                       records_per_shard: int | None = None, workers: int | None = None,
                       order: str = "resample_first", nan_policy: str = "refuse",
                       fs: float | None = None, show_progress: bool = True,
                       missing_leads: str = "refuse"
                       ) -> records_lib.RecordsManifest:
  """Runs (or resumes) a preprocessing job; returns the complete manifest."""
  src, out = pathlib.Path(src), as_path(out)
  labels_csv = pathlib.Path(labels_csv) if labels_csv else None
  if label_source is None:
    label_source = "csv" if labels_csv or src.suffix.lower() == ".csv" else "dx"
  if label_source not in ("dx", "csv"):
    raise ValueError(f"label_source must be 'dx' or 'csv', found {label_source!r}")
  if num_shards is not None and records_per_shard is not None:
    raise ValueError("give the number of shards or the records per shard, not both")
  for name, value in (("shards", num_shards), ("records per shard", records_per_shard),
                      ("workers", workers)):
    if value is not None and value < 1:
      raise ValueError(f"{name} must be at least 1, found {value}")
  workers = workers or os.cpu_count() or 1
  sources, label_names = list_sources(src, labels_csv, label_start_index, label_source)
  if num_shards is None:
    num_shards = math.ceil(len(sources) / (records_per_shard or DEFAULT_RECORDS_PER_SHARD))
  num_shards = min(num_shards, len(sources))
  settings = PrepareSettings(order=order, nan_policy=nan_policy, fs=fs, label_source=label_source,
                             missing_leads=missing_leads)
  job = _job_fingerprint(sources, settings, num_shards, labels_csv, label_start_index)
  manifest = _prepare_out(out, job)

  context = multiprocessing.get_context("spawn")  # TensorFlow in the parent is not fork-safe
  pool = context.Pool(workers, initializer=limit_worker_threads) if workers > 1 else None
  try:
    if manifest is None:
      if label_source == "dx":
        chunks = max(1, len(sources) // (8 * workers))
        codes = (pool.imap(_dx_codes, sources, chunksize=chunks) if pool else map(_dx_codes, sources))
        label_sets = list(progress_bar(codes, total=len(sources), desc="reading labels", unit="record",
                               disable=not show_progress))
        label_names = MultiLabelEncoder.from_label_sets(label_sets).label_names
      manifest = records_lib.RecordsManifest(
          job=job, label_names=list(label_names), shards=[],
          preprocessing={"order": order, "nan_policy": nan_policy, "target_fs": 500,
                         "fs_given": fs, "missing_leads": missing_leads, "zeroed_leads": {}})
      records_lib.write_manifest(out, manifest)
    settings = dataclasses.replace(settings, label_names=tuple(manifest.label_names))
    with contextlib.nullcontext() if pool else threadpool_limits(1):  # in this process: as a worker
      _write_shards(out, sources, manifest, settings, num_shards, pool, show_progress)
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  manifest.shards.sort(key=lambda shard: shard.file)
  manifest.complete = True
  records_lib.write_manifest(out, manifest)
  return manifest


def _write_shards(out: AnyPath, sources: Sequence[RecordSource],
                  manifest: records_lib.RecordsManifest, settings: PrepareSettings, num_shards: int,
                  pool: Any, show_progress: bool) -> None:
  """Writes every shard not yet in the manifest, updating the manifest after each one."""
  finished = {shard.file for shard in manifest.shards if (out / shard.file).is_file()}
  manifest.shards = [shard for shard in manifest.shards if shard.file in finished]
  blocks = shard_assignment(len(sources), num_shards)
  todo = [(i, block) for i, block in enumerate(blocks)
          if records_lib.shard_file_name(i, num_shards) not in finished]
  queue = [(sources[j], settings) for _, block in todo for j in block]
  results: Iterator[Any] = (pool.imap(encode_task, queue, chunksize=2) if pool else
                            map(encode_task, queue))
  progress = progress_bar(total=len(sources), initial=len(sources) - len(queue), desc="preprocessing",
                  unit="record", disable=not show_progress)
  for index, block in todo:
    rates: Counter[str] = Counter()
    failures: list[dict[str, str]] = []

    def shard_examples(count: int) -> Iterator[bytes]:
      for _ in range(count):
        result = next(results)
        progress.update(1)
        if isinstance(result, tuple):
          failures.append({"path": result[0], "reason": result[1]})
          progress.write(f"skipped {result[0]}: {result[1]}", file=sys.stderr)
          continue
        rates[f"{result.source_fs:g}"] += 1
        if result.zeroed_leads:
          zeroed = manifest.preprocessing.setdefault("zeroed_leads", {})
          zeroed[result.record_id] = list(result.zeroed_leads)
        yield result.example

    name = records_lib.shard_file_name(index, num_shards)
    written = records_lib.write_shard(out / name, shard_examples(len(block)))
    manifest.shards.append(records_lib.ShardInfo(file=name, num_records=written))
    manifest.num_records += written
    manifest.failures.extend(failures)
    for rate, count in rates.items():
      manifest.source_sampling_rates[rate] = manifest.source_sampling_rates.get(rate, 0) + count
    records_lib.write_manifest(out, manifest)
  progress.close()
