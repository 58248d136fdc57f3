"""The PhysioNet/CinC 2021 challenge score: partial credit from the reward matrix of weights.csv.

For binary labels L and binary outputs O over the scored classes (N records, C classes), record n
spreads one unit of credit over its pairs: A[i, j] = sum_n L[n, i] O[n, j] / max(1, |L_n or O_n|),
where |L_n or O_n| counts the classes that are a label or an output of record n. The raw score is
sum_ij W[i, j] A[i, j] with W the reward matrix. It is normalised between the score of an inactive
classifier (outputs: sinus rhythm 426783006 alone, the normal class) and a perfect one (outputs =
labels): (observed - inactive) / (correct - inactive), 0 when the two coincide. 1 is perfect, 0 as
good as always answering "normal", and it can be negative.

Model outputs map to classes by code (a column '713427006|59118001' from `snomed.merge_equivalent`
is that class; separate 713427006 and 59118001 columns both feed it, OR-ed). Columns of unscored
codes are left out, and so are classes no column covers: the score is the challenge's metric
restricted to the classes the model predicts. Without a sinus-rhythm column the inactive classifier
outputs nothing.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from hubert_ecg_jax.evaluate.metrics import jsonable
from hubert_ecg_jax.evaluate.snomed import SEPARATOR, WEIGHTS_TABLE, scored_classes, table_path

NORMAL_CLASS = "426783006"  # sinus rhythm


@functools.cache
def reward_matrix() -> np.ndarray:
  """weights.csv as a (classes, classes) float64 array, rows and columns in `scored_classes()` order."""
  with table_path(WEIGHTS_TABLE).open(newline="") as stream:
    rows = list(csv.reader(stream))
  columns = [tuple(entry.split(SEPARATOR)) for entry in rows[0][1:]]
  if tuple(columns) != scored_classes() or [tuple(r[0].split(SEPARATOR)) for r in rows[1:]] != columns:
    raise ValueError(f"{WEIGHTS_TABLE}: expected the same classes in rows and columns")
  return np.asarray([[float(value) for value in row[1:]] for row in rows[1:]])


@dataclasses.dataclass
class ChallengeScore:
  """The normalised challenge score, its three raw scores and what it was computed over."""
  score: float
  observed: float
  correct: float
  inactive: float
  classes: list[str]  # the scored classes the model's columns cover, weights.csv names
  ignored_labels: list[str]  # model columns that are not scored codes

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def class_columns(labels: Sequence[str]) -> tuple[list[int], list[list[int]], list[str]]:
  """(covered class indices, for each the model columns feeding it, the columns left out)."""
  index_of_code = {code: i for i, codes in enumerate(scored_classes()) for code in codes}
  feeding: dict[int, list[int]] = {}
  ignored = []
  for column, label in enumerate(labels):
    classes = {index_of_code.get(code) for code in str(label).split(SEPARATOR)}
    if None in classes or len(classes) != 1:
      ignored.append(str(label))
      continue
    feeding.setdefault(classes.pop(), []).append(column)
  covered = sorted(feeding)
  return covered, [feeding[i] for i in covered], ignored


def credit_matrix(labels: np.ndarray, outputs: np.ndarray) -> np.ndarray:
  """A (C, C): A[i, j] = sum_n labels[n, i] outputs[n, j] / max(1, |labels_n or outputs_n|)."""
  labels, outputs = labels.astype(np.float64), outputs.astype(np.float64)
  normaliser = np.maximum(np.logical_or(labels, outputs).sum(axis=1), 1.0)  # (N,)
  return (labels / normaliser[:, None]).T @ outputs


def challenge_score(y_true: Any, y_pred: Any, labels: Sequence[str]) -> ChallengeScore:
  """The challenge score of binary predictions y_pred (N, L) against y_true (N, L), columns `labels`."""
  y_true, y_pred = np.asarray(y_true) > 0.5, np.asarray(y_pred) > 0.5
  if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(labels):
    raise ValueError(f"expected y_true and y_pred of shape (records, {len(labels)}), found "
                     f"{y_true.shape} and {y_pred.shape}")
  covered, feeding, ignored = class_columns(labels)
  if not covered:
    raise ValueError(f"no label is a scored challenge code (weights.csv), found {list(labels)[:10]}")
  names = [SEPARATOR.join(scored_classes()[i]) for i in covered]
  weights = reward_matrix()[np.ix_(covered, covered)]

  def by_class(values: np.ndarray) -> np.ndarray:  # (N, L) -> (N, covered classes)
    return np.stack([values[:, columns].any(axis=1) for columns in feeding], axis=1)

  truth, predicted = by_class(y_true), by_class(y_pred)
  inactive_outputs = np.zeros_like(truth)
  if NORMAL_CLASS in names:
    inactive_outputs[:, names.index(NORMAL_CLASS)] = True
  observed, correct, inactive = (float((weights * credit_matrix(truth, outputs)).sum())
                                 for outputs in (predicted, truth, inactive_outputs))
  score = (observed - inactive) / (correct - inactive) if correct != inactive else 0.0
  return ChallengeScore(float(score), observed, correct, inactive, names, ignored)
