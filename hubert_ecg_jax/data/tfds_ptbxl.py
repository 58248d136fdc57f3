"""TensorFlow Datasets builder for PTB-XL (v1.0.3): the six label tasks, official strat_fold splits.

More in docs/modules.md."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from hubert_ecg_jax.data.labels import (
    PTBXL_TASKS, MultiLabelEncoder, parse_scp_codes, ptbxl_task_label_names, ptbxl_task_labels,
    read_scp_statements)
from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, TARGET_FS, prepare_record
from hubert_ecg_jax.data.readers import read_wfdb

PTBXL_ARCHIVE_URL = ("https://physionet.org/static/published-projects/ptb-xl/"
                     "ptb-xl-a-large-publicly-available-electrocardiography-dataset-1.0.3.zip")
PTBXL_SPLIT_FOLDS: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 7, 8), "validation": (9,), "test": (10,)}
PTBXL_NUM_SAMPLES = 5000  # 10 s at 500 Hz
_REQUIRED = ("ptbxl_database.csv", "scp_statements.csv", "records500")
_DATABASE_COLUMNS = ("ecg_id", "age", "sex", "scp_codes", "strat_fold", "filename_hr")
_TASK_DESCRIPTIONS = {
    "all": "every SCP statement (71 labels)",
    "diag": "diagnostic statements (44 labels)",
    "subdiag": "diagnostic subclasses (23 labels)",
    "superdiag": "diagnostic superclasses (5 labels)",
    "form": "form statements (19 labels)",
    "rhythm": "rhythm statements (12 labels)",
}


@dataclasses.dataclass
class PtbXlConfig(tfds.core.BuilderConfig):
  """One PTB-XL label task."""
  task: str = "all"


def find_ptbxl_root(folder: Path) -> Path:
  """The folder (folder itself or a sub-folder up to two levels down) holding the PTB-XL files."""
  folder = Path(folder)
  candidates = [folder] + sorted(folder.glob("*/")) + sorted(folder.glob("*/*/"))
  for candidate in candidates:
    if all((candidate / name).exists() for name in _REQUIRED):
      return candidate
  raise FileNotFoundError(
      f"no PTB-XL tree in {folder}: expected a folder holding {list(_REQUIRED)} (the extracted "
      "PhysioNet archive)")


def verify_sha256sums(root: Path) -> int:
  """Checks every file listed in `root/SHA256SUMS.txt`; returns how many. Raises ValueError naming the
  first missing or corrupt file."""
  listing = Path(root) / "SHA256SUMS.txt"
  checked = 0
  for line_number, line in enumerate(listing.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    expected, _, relative = line.strip().partition(" ")
    relative = relative.strip().lstrip("*")
    path = Path(root) / relative
    if len(expected) != 64 or not relative:
      raise ValueError(f"{listing}:{line_number}: expected '<sha256> <path>', got {line!r}")
    if not path.is_file():
      raise ValueError(f"PTB-XL archive is incomplete: {relative} is listed in SHA256SUMS.txt but missing")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
      for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    if digest.hexdigest() != expected:
      raise ValueError(f"PTB-XL archive is corrupt: SHA-256 of {relative} is {digest.hexdigest()}, "
                       f"SHA256SUMS.txt says {expected}")
    checked += 1
  return checked


def read_ptbxl_database(path: Path) -> list[dict[str, str]]:
  """Rows of ptbxl_database.csv (as strings), checked for the columns the builder uses."""
  with open(path, newline="") as handle:
    rows = list(csv.DictReader(handle))
  if not rows:
    raise ValueError(f"{path}: no records")
  missing = [column for column in _DATABASE_COLUMNS if column not in rows[0]]
  if missing:
    raise ValueError(f"{path}: columns {missing} missing; found {list(rows[0])}")
  return rows


def _float_or_nan(text: str) -> float:
  return float(text) if text.strip() else float("nan")


class PtbXl(tfds.core.GeneratorBasedBuilder):
  """PTB-XL 12-lead ECGs at 500 Hz, preprocessed as HuBERT-ECG expects, for one of six label tasks."""

  VERSION = tfds.core.Version("1.0.3")
  RELEASE_NOTES = {"1.0.3": "PTB-XL v1.0.3, records500, strat_fold splits 1-8 / 9 / 10."}
  BUILDER_CONFIGS = [PtbXlConfig(name=task, task=task, description=_TASK_DESCRIPTIONS[task])
                     for task in PTBXL_TASKS]
  ARCHIVE_URL = PTBXL_ARCHIVE_URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download PTB-XL 1.0.3 from https://physionet.org/content/ptb-xl/1.0.3/ and extract it; the manual "
      "dir must hold records500/, ptbxl_database.csv and scp_statements.csv (or one folder that does). "
      "Without a manual dir the builder downloads the archive itself.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "signal": tfds.features.Tensor(shape=(len(STANDARD_LEADS), PTBXL_NUM_SAMPLES), dtype=np.float32),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "label_ids": tfds.features.Sequence(tfds.features.ClassLabel()),
            "ecg_id": np.int32,
            "age": np.float32,
            "sex": np.int32,  # 0 male, 1 female (PTB-XL's coding), -1 unknown
            "strat_fold": np.int32,
        }),
        homepage="https://physionet.org/content/ptb-xl/1.0.3/",
        metadata=tfds.core.MetadataDict(),
        citation="Wagner et al., PTB-XL, a large publicly available electrocardiography dataset. "
        "Scientific Data 7, 154 (2020).",
    )

  def _source_root(self, dl_manager: tfds.download.DownloadManager) -> Path:
    try:
      return find_ptbxl_root(Path(dl_manager.manual_dir))
    except AssertionError:  # no manual dir given: download the official archive
      extracted = Path(dl_manager.download_and_extract(self.ARCHIVE_URL))
      root = find_ptbxl_root(extracted)
      if (root / "SHA256SUMS.txt").is_file():
        logging.info("PTB-XL: verified %d files against SHA256SUMS.txt", verify_sha256sums(root))
      else:
        logging.warning("PTB-XL archive has no SHA256SUMS.txt; only the ZIP's CRC-32 checks were applied")
      return root

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._source_root(dl_manager)
    statements = read_scp_statements(root / "scp_statements.csv")
    label_names = ptbxl_task_label_names(statements, self.builder_config.task)
    self.info.features["label_ids"].feature.names = list(label_names)
    self.info.metadata.update({"task": self.builder_config.task, "label_names": list(label_names),
                               "fs": TARGET_FS, "lead_names": list(STANDARD_LEADS)})
    rows = read_ptbxl_database(root / "ptbxl_database.csv")
    return {split: self._generate_examples(root, rows, statements, label_names, folds)
            for split, folds in PTBXL_SPLIT_FOLDS.items()}

  def _generate_examples(self, root: Path, rows: list[dict[str, str]], statements, label_names, folds
                         ) -> Iterator[tuple[int, dict]]:
    encoder = MultiLabelEncoder(label_names)
    for row in rows:
      if int(float(row["strat_fold"])) not in folds:
        continue
      ecg_id = int(float(row["ecg_id"]))
      record = read_wfdb(root / f"{row['filename_hr']}.hea")
      signal = prepare_record(record.signal, record.fs, record.lead_names)  # (12, 5000)
      if signal.shape != (len(STANDARD_LEADS), PTBXL_NUM_SAMPLES):
        raise ValueError(f"PTB-XL record {ecg_id} has shape {signal.shape} at 500 Hz, expected (12, 5000)")
      labels = ptbxl_task_labels(parse_scp_codes(row["scp_codes"]), statements, self.builder_config.task)
      sex = row["sex"].strip()
      yield ecg_id, {
          "signal": signal,
          "labels": encoder.encode(labels),
          "label_ids": [label_names.index(label) for label in labels],
          "ecg_id": ecg_id,
          "age": _float_or_nan(row["age"]),
          "sex": int(float(sex)) if sex else -1,
          "strat_fold": int(float(row["strat_fold"])),
      }
