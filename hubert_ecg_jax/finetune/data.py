"""The train / val / test data of a fine-tuning run, always as records directories.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from hubert_ecg_jax.data import ingest, records as records_lib
from hubert_ecg_jax.data.pipeline import make_labels_iterator
from hubert_ecg_jax.files import AnyPath, as_path
from hubert_ecg_jax.progress import progress_bar

SOURCES = ("records", "split_csv", "tfds")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the splits come from (see the module docstring)."""
  source: str = "records"
  train: str = ""
  val: str = ""
  test: str = ""
  records_dir: str = ""  # split_csv: the folder CSV file names are relative to
  label_start_index: int = 3  # split_csv: 3; 4 for PTB-XL and SPH; 6 for SaMi-Trop
  fs: float | None = None  # split_csv: sampling rate of .npy / .csv records (they do not store it)
  tfds_name: str = ""  # tfds: builder/config, e.g. "ptb_xl/superdiag"
  tfds_data_dir: str = ""  # tfds: where TFDS keeps prepared datasets ("" = its default)
  manual_dir: str = ""  # tfds: the downloaded dataset (PTB-XL folder, records + labels.csv)
  workers: int | None = None  # split_csv: processes preparing records; None: all cores
  train_fraction: float = 1.0  # < 1: train on a seeded, label-stratified fraction (finetune.fraction)
  fraction_seed: int = 0  # the seed of that fraction
  skip_corrupted: bool = False  # training records of a damaged shard are skipped, not a stop

  def __post_init__(self) -> None:
    if not 0.0 < self.train_fraction <= 1.0:
      raise ValueError(f"data.train_fraction must lie in (0, 1], found {self.train_fraction}")
    if self.source not in SOURCES:
      raise ValueError(f"data.source must be one of {SOURCES}, found {self.source!r}")
    missing = [name for name in ("train", "val") if not getattr(self, name)]
    if missing:
      raise ValueError(f"set the {' and '.join(missing)} data: --config.data.{missing[0]}=... "
                       f"({_WHAT[self.source]})")
    if self.source == "split_csv" and not self.records_dir:
      raise ValueError("data.source 'split_csv' needs data.records_dir, the folder the CSV file "
                       "names are relative to")
    if self.source == "tfds" and not self.tfds_name:
      raise ValueError("data.source 'tfds' needs data.tfds_name, e.g. 'ptb_xl/superdiag'")

  def splits(self) -> dict[str, str]:
    return {name: getattr(self, name) for name in SPLITS if getattr(self, name)}


_WHAT = {"records": "a records directory written by `hubert-ecg-jax preprocess`",
         "split_csv": "a split CSV (file name, metadata, label columns)",
         "tfds": "a TFDS split name such as train / validation / test"}


def resolve_splits(config: DataConfig, workdir: str | os.PathLike, progress: bool = True
                   ) -> dict[str, AnyPath]:
  """Split name -> records directory, preparing split CSVs and TFDS splits into `workdir/data`."""
  workdir = as_path(workdir)
  resolved = {}
  for split, value in config.splits().items():
    if config.source == "records":
      resolved[split] = as_path(value)
      records_lib.shard_paths(value)  # a complete directory, or a clear error now
    elif config.source == "split_csv":
      resolved[split] = materialise_split_csv(
          value, config.records_dir, workdir / "data" / split, config.label_start_index, config.fs,
          config.workers, progress)
    else:
      resolved[split] = materialise_tfds_split(config, value, workdir / "data" / split, progress)
  return resolved


def read_labels(directory: str | os.PathLike, skip_corrupted: bool = False
                ) -> tuple[list[str], np.ndarray, list[str]]:
  """(record ids, labels (N, columns) float32, column names) of a records directory, in file order.

  A damaged shard stops it with `CorruptShardError`, or with `skip_corrupted` its unreadable
  records are left out (as training leaves them out, and tells of them).
  """
  manifest = records_lib.read_manifest(directory)
  ids, labels = [], []
  for batch in make_labels_iterator(directory, skip_corrupted, log=lambda note: None):
    ids.extend(batch["record_id"].tolist())
    labels.append(batch["labels"])
  stacked = np.concatenate(labels) if labels else np.zeros((0, manifest.num_labels), np.float32)
  return ids, stacked, list(manifest.label_names)


# ------------------------------------------------------------------------------------------------
# Writing records directories


def _reusable(directory: pathlib.Path, job: dict[str, Any]) -> bool:
  """True when `directory` holds a complete records directory written for `job`."""
  if not (directory / records_lib.MANIFEST_NAME).is_file():
    return False
  manifest = records_lib.read_manifest(directory)
  if manifest.job != job or not manifest.complete:
    raise FileExistsError(f"{directory} holds data prepared from other settings ({manifest.job}); "
                          "use another workdir or delete that folder")
  return True


def materialise_split_csv(csv_path: str | os.PathLike, records_dir: str | os.PathLike,
                          directory: pathlib.Path, label_start_index: int = 3,
                          fs: float | None = None, workers: int | None = None, progress: bool = True,
                          missing_leads: str = "refuse") -> pathlib.Path:
  """Prepares the records a split CSV lists (file names relative to `records_dir`) into a records
  directory at `directory`, reused when the CSV and settings are unchanged (`missing_leads`:
  `prepare_record`'s)."""
  csv_path = pathlib.Path(csv_path)
  records_dir = pathlib.Path(records_dir)
  job = {"source": "split_csv", "csv": str(csv_path.absolute()), "csv_sha256": ingest.file_digest(csv_path),
         "records_dir": str(records_dir.absolute()), "label_start_index": label_start_index,
         "fs": fs, **({"missing_leads": missing_leads} if missing_leads != "refuse" else {})}
  if _reusable(directory, job):
    return directory
  sources, label_names = ingest.csv_sources(csv_path, label_start_index, records_dir)
  settings = ingest.PrepareSettings(fs=fs, label_source="csv", missing_leads=missing_leads)
  failures: list[dict[str, str]] = []
  workers = workers or os.cpu_count() or 1

  def prepared(results: Iterator[Any]) -> Iterator[records_lib.StoredRecord]:
    for result in progress_bar(results, total=len(sources), desc=f"preparing {csv_path.name}",
                       unit="record", disable=not progress):
      if isinstance(result, tuple):
        failures.append({"path": result[0], "reason": result[1]})
        print(f"skipped {result[0]}: {result[1]}", file=sys.stderr)
      else:
        yield result

  tasks = [(source, settings) for source in sources]
  if workers > 1 and len(sources) > 1:
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=ingest.limit_worker_threads) as pool:
      records_lib.write_records(directory, prepared(pool.imap(ingest.prepare_task, tasks, chunksize=4)),
                                label_names, job=job, failures=failures)
  else:
    records_lib.write_records(directory, prepared(map(ingest.prepare_task, tasks)), label_names,
                              job=job, failures=failures)
  return directory


def materialise_tfds_split(config: DataConfig, split: str, directory: pathlib.Path,
                           progress: bool = True) -> pathlib.Path:
  """Copies one split of a TFDS ECG dataset (features `signal` (12, n) at 500 Hz and `labels`, label
  names in the builder's metadata) into a records directory (reused when unchanged)."""
  import tensorflow_datasets as tfds

  import hubert_ecg_jax.data.tfds_folder  # noqa: F401  (registers the builders with TFDS)
  import hubert_ecg_jax.data.tfds_ptbxl  # noqa: F401

  builder = tfds.builder(config.tfds_name, data_dir=config.tfds_data_dir or None)
  job = {"source": "tfds", "name": config.tfds_name, "version": str(builder.version), "split": split}
  if _reusable(directory, job):
    return directory
  download = tfds.download.DownloadConfig(manual_dir=config.manual_dir or None, try_download_gcs=False)
  builder.download_and_prepare(download_config=download)
  if split not in builder.info.splits:
    raise ValueError(f"{config.tfds_name} has splits {sorted(builder.info.splits)}, not {split!r}")
  label_names = list(builder.info.metadata.get("label_names", ()))
  if not label_names:
    raise ValueError(f"{config.tfds_name} does not name its labels (metadata 'label_names')")
  total = builder.info.splits[split].num_examples

  def stored() -> Iterator[records_lib.StoredRecord]:
    examples = builder.as_dataset(split=split).as_numpy_iterator()
    for index, example in enumerate(progress_bar(examples, total=total, desc=f"copying {split}",
                                         unit="record", disable=not progress)):
      record_id = example.get("ecg_id", example.get("record", index))
      record_id = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
      yield records_lib.StoredRecord(
          record_id=record_id, source=f"tfds:{config.tfds_name}/{split}",
          signal=np.asarray(example["signal"], np.float32), labels=example["labels"],
          source_fs=float(example.get("source_fs", 500.0)),
          age=float(example.get("age", np.nan)))

  records_lib.write_records(directory, stored(), label_names, job=job)
  return directory
