"""A TensorFlow Datasets builder for "a folder of ECG records plus a labels CSV", and the CSV template.

More in docs/modules.md."""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hubert_ecg_jax.data.labels import snomed_codes_from_header
from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, TARGET_FS, prepare_record
from hubert_ecg_jax.data.readers import DEFAULT_FIND_EXTENSIONS, find_records, read_record

LABELS_CSV_NAME = "labels.csv"
RECORD_COLUMN, FS_COLUMN, SPLIT_COLUMN = "record", "fs", "split"
_SPLIT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass
class LabelsTable:
  """A labels CSV, read and checked."""
  records: list[str]
  fs: list[float | None]
  splits: list[str]
  label_names: tuple[str, ...]
  labels: np.ndarray  # (N, L) float32 of 0/1


def read_labels_csv(path: str | os.PathLike) -> LabelsTable:
  """Reads a labels CSV (see the module docstring); empty or non-0/1 label cells are refused."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"labels CSV {path} not found")
  with open(path, newline="") as handle:
    reader = csv.reader(handle)
    header = [name.strip() for name in next(reader, [])]
    rows = [row for row in reader if any(cell.strip() for cell in row)]
  if not header or header[0] != RECORD_COLUMN:
    raise ValueError(f"{path}: the first column must be '{RECORD_COLUMN}', got columns {header}")
  label_columns = [i for i, name in enumerate(header) if name not in (RECORD_COLUMN, FS_COLUMN, SPLIT_COLUMN)]
  if not label_columns:
    raise ValueError(f"{path}: no label columns; expected one column per label after {header}")
  if not rows:
    raise ValueError(f"{path}: no records")
  labels = np.zeros((len(rows), len(label_columns)), np.float32)
  fs: list[float | None] = []
  splits: list[str] = []
  for line, row in enumerate(rows, start=2):
    if len(row) != len(header):
      raise ValueError(f"{path}:{line}: {len(row)} values, expected {len(header)} ({header})")
    values = dict(zip(header, (cell.strip() for cell in row)))
    if not values[RECORD_COLUMN]:
      raise ValueError(f"{path}:{line}: the record column is empty")
    for j, column in enumerate(label_columns):
      cell = row[column].strip()
      if cell not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"{path}:{line}: label {header[column]!r} of {values[RECORD_COLUMN]} is "
                         f"{cell!r}; fill in 0 or 1")
      labels[line - 2, j] = float(cell)
    rate = values.get(FS_COLUMN, "")
    try:
      fs.append(float(rate) if rate else None)
    except ValueError as error:
      raise ValueError(f"{path}:{line}: fs {rate!r} is not a number") from error
    split = values.get(SPLIT_COLUMN, "train")
    if not _SPLIT_NAME.match(split):
      raise ValueError(f"{path}:{line}: split {split!r} of {values[RECORD_COLUMN]} must be a name such as "
                       "train, validation or test")
    splits.append(split)
  records = [row[0].strip() for row in rows]
  duplicates = sorted({record for record in records if records.count(record) > 1})
  if duplicates:
    raise ValueError(f"{path}: records listed more than once: {duplicates[:5]}")
  return LabelsTable(records=records, fs=fs, splits=splits,
                     label_names=tuple(header[i] for i in label_columns), labels=labels)


def write_labels_template(folder: str | os.PathLike, out: str | os.PathLike | None = None,
                          labels: Sequence[str] = (), with_split: bool = False,
                          extensions: Sequence[str] = DEFAULT_FIND_EXTENSIONS, overwrite: bool = False) -> Path:
  """Writes the labels CSV template of `folder` (default `folder/labels.csv`); returns its path.

  Columns: record, fs (only when some records are not WFDB), split (when `with_split`, empty), then the
  sorted union of `labels` and every `# Dx:` code found. A WFDB record with `# Dx:` codes gets 1/0 in the
  code columns; every other cell is left empty for the user.
  """
  folder = Path(folder)
  out = folder / LABELS_CSV_NAME if out is None else Path(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite (--force) to replace it")
  records = find_records(folder, extensions)
  if not records:
    raise ValueError(f"no records ({', '.join(extensions)}) found under {folder}")
  codes = {path: snomed_codes_from_header(path) if path.suffix.lower() == ".hea" else () for path in records}
  code_columns = sorted({code for record_codes in codes.values() for code in record_codes})
  label_columns = sorted(set(code_columns) | set(labels))
  needs_fs = any(path.suffix.lower() != ".hea" for path in records)
  header = [RECORD_COLUMN] + ([FS_COLUMN] if needs_fs else []) + ([SPLIT_COLUMN] if with_split else [])
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(header + label_columns)
    for path in records:
      record_codes = codes[path]
      cells = [("1" if name in record_codes else "0") if record_codes and name in code_columns else ""
               for name in label_columns]
      writer.writerow([path.relative_to(folder).as_posix()] + [""] * (len(header) - 1) + cells)
  return out


@dataclasses.dataclass
class EcgFolderConfig(tfds.core.BuilderConfig):
  """Which CSV in the manual dir lists the records and labels, and the filter/resample order."""
  labels_csv: str = LABELS_CSV_NAME
  order: str = "resample_first"


class EcgFolder(tfds.core.GeneratorBasedBuilder):
  """ECG records of a folder with a labels CSV, preprocessed offline to 500 Hz."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [EcgFolderConfig(name="default", description="labels.csv, resample then filter")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the records and a labels.csv (write one with `hubert-ecg-jax labels-template FOLDER`) in the "
      "manual dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "signal": tfds.features.Tensor(shape=(len(STANDARD_LEADS), None), dtype=np.float32),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "label_ids": tfds.features.Sequence(tfds.features.ClassLabel()),
            "record": tfds.features.Text(),
            "source_fs": np.float32,
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    table = read_labels_csv(root / self.builder_config.labels_csv)
    missing = [record for record in table.records if not (root / record).is_file()]
    if missing:
      raise FileNotFoundError(
          f"{root / self.builder_config.labels_csv} lists {len(missing)} record(s) not found under "
          f"{root}: {missing[:5]}; expected paths relative to the manual dir")
    self.info.features["label_ids"].feature.names = list(table.label_names)
    self.info.metadata.update({"label_names": list(table.label_names), "fs": TARGET_FS,
                               "lead_names": list(STANDARD_LEADS), "order": self.builder_config.order})
    return {split: self._generate_examples(root, table, split) for split in sorted(set(table.splits))}

  def _generate_examples(self, root: Path, table: LabelsTable, split: str) -> Iterator[tuple[str, dict]]:
    for index, record_path in enumerate(table.records):
      if table.splits[index] != split:
        continue
      record = read_record(root / record_path, fs=table.fs[index])
      signal = prepare_record(record.signal, record.fs, record.lead_names, order=self.builder_config.order)
      yield record_path, {
          "signal": signal,
          "labels": table.labels[index],
          "label_ids": np.flatnonzero(table.labels[index]).tolist(),
          "record": record_path,
          "source_fs": record.fs,
      }
