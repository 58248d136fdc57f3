"""What a fine-tuned model predicts, and how dataset label columns become its training targets.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

TASKS = ("multi_label", "multi_class", "regression")


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
  return task


@dataclasses.dataclass(frozen=True)
class Task:
  """The prediction task of a classifier: its kind, output names and dataset columns."""
  kind: str  # multi_label | multi_class | regression
  output_names: tuple[str, ...]
  source_columns: tuple[str, ...]  # dataset columns the targets come from

  def __post_init__(self) -> None:
    check_task(self.kind)
    object.__setattr__(self, "output_names", tuple(str(n) for n in self.output_names))
    object.__setattr__(self, "source_columns", tuple(str(n) for n in self.source_columns))
    if not self.output_names:
      raise ValueError("a task needs at least one output")
    if self.kind == "multi_class" and len(self.output_names) < 2:
      raise ValueError(f"a multi-class task needs at least 2 classes, found {list(self.output_names)}")

  @property
  def num_outputs(self) -> int:
    return len(self.output_names)

  @property
  def class_index_column(self) -> bool:
    """Multi-class targets come from one column holding the class index."""
    return self.kind == "multi_class" and len(self.source_columns) == 1

  def targets(self, labels: np.ndarray, column_names: Sequence[str], allow_missing: bool = False
              ) -> np.ndarray:
    """Dataset labels (N, columns) -> targets: (N, L) float32, (N,) int32 classes, or (N, T) float32.

    `allow_missing` (multi-label only) fills labels the dataset lacks with 0.
    """
    labels = np.asarray(labels, dtype=np.float32)
    column_names = [str(name) for name in column_names]
    if labels.ndim != 2 or labels.shape[1] != len(column_names):
      raise ValueError(f"expected labels of shape (records, {len(column_names)}) for columns "
                       f"{column_names[:5]}..., found {labels.shape}")
    index = {name: i for i, name in enumerate(column_names)}
    missing = [name for name in self.source_columns if name not in index]
    if missing and not (allow_missing and self.kind == "multi_label"):
      raise ValueError(f"the data lacks the label columns {missing[:10]} that this {self.kind} "
                       f"task uses (it has {column_names[:10]}{'...' if len(column_names) > 10 else ''})")
    picked = np.zeros((labels.shape[0], len(self.source_columns)), np.float32)
    for j, name in enumerate(self.source_columns):
      if name in index:
        picked[:, j] = labels[:, index[name]]
    if self.kind == "regression":
      return picked
    if self.kind == "multi_label":
      if not np.isin(picked, (0.0, 1.0)).all():
        raise ValueError("multi-label targets must be 0 or 1; use task 'regression' for other values")
      return picked
    return self._class_ids(picked)

  def _class_ids(self, picked: np.ndarray) -> np.ndarray:
    if self.class_index_column:
      values = picked[:, 0]
      if not (np.isin(values, np.arange(self.num_outputs))).all():
        bad = np.unique(values[~np.isin(values, np.arange(self.num_outputs))])[:5]
        raise ValueError(f"column {self.source_columns[0]!r} must hold class indices 0..."
                         f"{self.num_outputs - 1}, found {bad.tolist()}")
      return values.astype(np.int32)
    if not (np.isin(picked, (0.0, 1.0)).all() and (picked.sum(axis=1) == 1).all()):
      raise ValueError(f"one-hot class columns {list(self.source_columns)[:5]} must hold exactly one 1 "
                       "per record")
    return picked.argmax(axis=1).astype(np.int32)

  def probabilities(self, logits: np.ndarray) -> np.ndarray:
    """Model outputs (..., outputs) -> sigmoid, softmax, or the regression values themselves."""
    logits = np.asarray(logits, dtype=np.float64)
    if self.kind == "multi_label":
      return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the logistic function, without overflow
    if self.kind == "multi_class":
      shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
      return shifted / shifted.sum(axis=-1, keepdims=True)
    return logits

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "output_names": list(self.output_names),
            "source_columns": list(self.source_columns)}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> Task:
    try:
      return cls(data["kind"], tuple(data["output_names"]), tuple(data["source_columns"]))
    except (KeyError, TypeError) as error:
      raise ValueError(f"malformed task description {data!r}: expected kind, output_names and "
                       "source_columns") from error


def task_from_dataset(kind: str, column_names: Sequence[str], train_labels: np.ndarray,
                      columns: Sequence[str] = ()) -> Task:
  """The task over `columns` (default: every column) of a training set.

  Multi-class with one column: the classes are 0..max over the training set.
  """
  check_task(kind)
  column_names = [str(name) for name in column_names]
  columns = [str(name) for name in columns] or column_names
  unknown = [name for name in columns if name not in column_names]
  if unknown:
    raise ValueError(f"label columns {unknown} are not in the data (it has {column_names[:10]}...)")
  if kind == "multi_class" and len(columns) == 1:
    values = np.asarray(train_labels, np.float32)[:, column_names.index(columns[0])]
    if not (values >= 0).all() or not np.equal(np.round(values), values).all():
      raise ValueError(f"column {columns[0]!r} must hold integer class indices >= 0 for a "
                       "multi-class task")
    num_classes = max(int(values.max()) + 1, 2)
    return Task(kind, tuple(f"{columns[0]}={k}" for k in range(num_classes)), tuple(columns))
  return Task(kind, tuple(columns), tuple(columns))
