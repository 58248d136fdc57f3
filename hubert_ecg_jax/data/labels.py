"""Labels: CinC `# Dx:` SNOMED codes, PTB-XL `scp_codes` and its six label tasks, multi-hot encoding
with a fixed saved label order, and the original's reproducibility split CSVs."""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

PTBXL_TASKS: tuple[str, ...] = ("all", "diag", "subdiag", "superdiag", "form", "rhythm")
# Column of the first label in the original's split CSVs (filename, metadata..., labels...).
DEFAULT_LABEL_START_INDEX = 3
LABEL_START_INDEX_BY_DATASET: dict[str, int] = {"ptb_xl": 4, "sph": 4, "sami_trop": 6}
_MISSING_VALUES = {"", "nan", "unknown", "none"}


def _parse_age(text: str) -> float | None:
  if text.strip().lower() in _MISSING_VALUES:
    return None
  try:
    return float(text)
  except ValueError:
    return None


def parse_cinc_header_comments(comments: Sequence[str]) -> tuple[tuple[str, ...], dict]:
  """CinC header comment lines ('Age: 78', 'Sex: Male', 'Dx: 164889003,59118001') -> (codes, metadata).

  Codes keep their order, without duplicates; metadata has 'age' (float or None) and 'sex' (str)
  when present.
  """
  codes: list[str] = []
  metadata: dict = {}
  for line in comments:
    key, separator, value = line.lstrip("#").partition(":")
    if not separator:
      continue
    key, value = key.strip().lower(), value.strip()
    if key == "dx":
      for code in value.split(","):
        code = code.strip()
        if code and code not in codes:
          codes.append(code)
    elif key == "age":
      metadata["age"] = _parse_age(value)
    elif key == "sex":
      metadata["sex"] = value
  return tuple(codes), metadata


def snomed_codes_from_header(header_path: str | os.PathLike) -> tuple[str, ...]:
  """The `# Dx:` SNOMED codes of a WFDB header file (empty when it has none)."""
  header_path = Path(header_path)
  if not header_path.is_file():
    raise FileNotFoundError(f"WFDB header {header_path} not found")
  comments = [line.strip() for line in header_path.read_text().splitlines() if line.startswith("#")]
  return parse_cinc_header_comments(comments)[0]


def parse_scp_codes(text: str) -> dict[str, float]:
  """PTB-XL `scp_codes` ("{'NORM': 100.0, 'SR': 0.0}") -> {code: likelihood}."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as error:
    raise ValueError(f"malformed scp_codes {text!r}: expected a dict like {{'NORM': 100.0}}") from error
  if not isinstance(value, dict) or not all(
      isinstance(code, str) and isinstance(likelihood, (int, float)) for code, likelihood in value.items()):
    raise ValueError(f"malformed scp_codes {text!r}: expected a dict of code -> likelihood")
  return {code: float(likelihood) for code, likelihood in value.items()}


@dataclasses.dataclass(frozen=True)
class ScpStatement:
  """One row of PTB-XL's scp_statements.csv (only what the label tasks need)."""
  code: str
  diagnostic: bool
  form: bool
  rhythm: bool
  diagnostic_class: str
  diagnostic_subclass: str


def _flag(value: str) -> bool:
  value = value.strip()
  return bool(value) and float(value) == 1.0


def read_scp_statements(path: str | os.PathLike) -> dict[str, ScpStatement]:
  """PTB-XL scp_statements.csv (first column the code) -> {code: ScpStatement}."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"PTB-XL scp_statements.csv not found at {path}")
  with open(path, newline="") as handle:
    rows = list(csv.DictReader(handle))
  if not rows:
    raise ValueError(f"{path}: no statements")
  needed = ("diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass")
  code_column = next(iter(rows[0]))
  missing = [column for column in needed if column not in rows[0]]
  if missing:
    raise ValueError(f"{path}: columns {missing} missing; found {list(rows[0])}")
  statements = {}
  for row in rows:
    try:
      statements[row[code_column]] = ScpStatement(
          code=row[code_column], diagnostic=_flag(row["diagnostic"]), form=_flag(row["form"]),
          rhythm=_flag(row["rhythm"]), diagnostic_class=row["diagnostic_class"].strip(),
          diagnostic_subclass=row["diagnostic_subclass"].strip())
    except ValueError as error:
      raise ValueError(f"{path}: bad flag in the row of {row[code_column]!r} ({error})") from error
  return statements


def _check_task(task: str) -> None:
  if task not in PTBXL_TASKS:
    raise ValueError(f"unknown PTB-XL task {task!r}; expected one of {list(PTBXL_TASKS)}")


def _task_names_of(statement: ScpStatement, task: str) -> tuple[str, ...]:
  if task == "all":
    return (statement.code,)
  if task == "diag":
    return (statement.code,) if statement.diagnostic else ()
  if task == "subdiag":
    return (statement.diagnostic_subclass,) if statement.diagnostic and statement.diagnostic_subclass else ()
  if task == "superdiag":
    return (statement.diagnostic_class,) if statement.diagnostic and statement.diagnostic_class else ()
  if task == "form":
    return (statement.code,) if statement.form else ()
  return (statement.code,) if statement.rhythm else ()


def ptbxl_task_label_names(statements: Mapping[str, ScpStatement], task: str) -> tuple[str, ...]:
  """The sorted label names of a task (all 71, diag 44, subdiag 23, superdiag 5, form 19, rhythm 12 on
  the full PTB-XL statements)."""
  _check_task(task)
  return tuple(sorted({name for statement in statements.values() for name in _task_names_of(statement, task)}))


def ptbxl_task_labels(scp_codes: Mapping[str, float], statements: Mapping[str, ScpStatement],
                      task: str) -> tuple[str, ...]:
  """Labels of one record for a task: every code present counts, whatever its likelihood (as the
  original and the PTB-XL benchmark do). Sorted, without duplicates."""
  _check_task(task)
  unknown = [code for code in scp_codes if code not in statements]
  if unknown:
    raise ValueError(f"scp codes {unknown} are not in scp_statements.csv")
  return tuple(sorted({name for code in scp_codes for name in _task_names_of(statements[code], task)}))


@dataclasses.dataclass(frozen=True)
class MultiLabelEncoder:
  """Label names <-> multi-hot float32 vectors in a fixed order (saved as JSON with a model or dataset).

  `on_unknown`: "error" refuses labels outside `label_names`; "ignore" drops them.
  """
  label_names: tuple[str, ...]
  on_unknown: Literal["error", "ignore"] = "error"

  def __post_init__(self) -> None:
    names = tuple(str(name) for name in self.label_names)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
      raise ValueError(f"duplicate label names {duplicates}")
    if self.on_unknown not in ("error", "ignore"):
      raise ValueError(f"on_unknown must be 'error' or 'ignore', got {self.on_unknown!r}")
    object.__setattr__(self, "label_names", names)

  @classmethod
  def from_label_sets(cls, label_sets: Iterable[Iterable[str]], min_count: int = 1,
                      on_unknown: Literal["error", "ignore"] = "error") -> MultiLabelEncoder:
    """Labels occurring in at least `min_count` sets, sorted."""
    counts = Counter(label for labels in label_sets for label in set(labels))
    return cls(tuple(sorted(name for name, count in counts.items() if count >= min_count)), on_unknown)

  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  def encode(self, labels: Iterable[str]) -> np.ndarray:
    """Label names -> multi-hot float32 (num_labels,)."""
    index = {name: i for i, name in enumerate(self.label_names)}
    vector = np.zeros(len(self.label_names), dtype=np.float32)
    labels = [str(label) for label in labels]
    unknown = [label for label in labels if label not in index]
    if unknown and self.on_unknown == "error":
      raise ValueError(f"labels {unknown} are not among the {len(index)} known labels")
    vector[[index[label] for label in labels if label in index]] = 1.0
    return vector

  def decode(self, vector: np.ndarray, threshold: float = 0.5) -> tuple[str, ...]:
    """Scores or multi-hot (num_labels,) -> names with score >= threshold."""
    vector = np.asarray(vector)
    if vector.shape != (len(self.label_names),):
      raise ValueError(f"expected a vector of shape ({len(self.label_names)},), got {vector.shape}")
    return tuple(name for name, value in zip(self.label_names, vector) if value >= threshold)

  def save(self, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps({"label_names": list(self.label_names)}, indent=1) + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike, on_unknown: Literal["error", "ignore"] = "error") -> MultiLabelEncoder:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"label file {path} not found")
    content = json.loads(path.read_text())
    if not isinstance(content, dict) or not isinstance(content.get("label_names"), list):
      raise ValueError(f"{path}: expected a JSON object with a 'label_names' list")
    return cls(tuple(content["label_names"]), on_unknown)


@dataclasses.dataclass
class SplitTable:
  """One of the original's reproducibility split CSVs, read."""
  filenames: list[str]
  metadata: dict[str, np.ndarray]  # column -> (N,) float64 where numeric (NaN when empty), else str
  label_names: tuple[str, ...]
  labels: np.ndarray  # (N, L) float32


def _column_array(values: list[str]) -> np.ndarray:
  try:
    return np.array([np.nan if value.strip() == "" else float(value) for value in values], np.float64)
  except ValueError:
    return np.array(values, dtype=str)


def read_split_csv(path: str | os.PathLike, label_start_index: int = DEFAULT_LABEL_START_INDEX) -> SplitTable:
  """A split CSV (filename, metadata columns, then one 0/1 column per label from `label_start_index`:
  3 by default, 4 for PTB-XL and SPH, 6 for SaMi-Trop)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"split CSV {path} not found")
  with open(path, newline="") as handle:
    reader = csv.reader(handle)
    header = next(reader, [])
    rows = [row for row in reader if row]
  if label_start_index < 1 or len(header) <= label_start_index:
    raise ValueError(
        f"{path}: label_start_index {label_start_index} needs more than {label_start_index} columns "
        f"(filename, metadata, labels), found {len(header)}: {header}")
  short = [i + 2 for i, row in enumerate(rows) if len(row) != len(header)]
  if short:
    raise ValueError(f"{path}: lines {short[:5]} do not have {len(header)} values")
  try:
    labels = np.array([[float(value) for value in row[label_start_index:]] for row in rows], np.float32)
  except ValueError as error:
    raise ValueError(
        f"{path}: label columns from index {label_start_index} ({header[label_start_index]!r}) must be "
        f"numeric ({error}); is label_start_index right?") from error
  labels = labels.reshape(len(rows), len(header) - label_start_index)
  metadata = {header[i]: _column_array([row[i] for row in rows]) for i in range(1, label_start_index)}
  return SplitTable(filenames=[row[0] for row in rows], metadata=metadata,
                    label_names=tuple(header[label_start_index:]), labels=labels)
