"""Readable findings: SNOMED CT codes of the PhysioNet/CinC 2021 challenge with names and abbreviations.

The tables ship in `hubert_ecg_jax/evaluate/cinc2021/` (the challenge's `dx_mapping_scored.csv`,
`dx_mapping_unscored.csv` and `weights.csv`; see SOURCE.md there): 133 diagnoses, 30 scored. A label
that is not a known code (a PTB-XL statement, a CSV column) keeps its own name unless `descriptions`
(e.g. PTB-XL's scp_statements.csv descriptions) names it. Codes the challenge scores as one diagnosis
(`a|b` in weights.csv, e.g. RBBB 713427006|59118001) can be merged into one column (`merge_equivalent`).
PTB-XL statements are named by the `description` column of the dataset's own scp_statements.csv
(`ptbxl_descriptions`), its five diagnostic superclasses as the PTB-XL paper names them.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

TABLES = "cinc2021"
SCORED_TABLE = "dx_mapping_scored.csv"
UNSCORED_TABLE = "dx_mapping_unscored.csv"
WEIGHTS_TABLE = "weights.csv"
SEPARATOR = "|"  # joins codes scored as one diagnosis, as weights.csv does
# PTB-XL's diagnostic superclasses (Wagner et al., Scientific Data 2020), the superdiag task's labels.
PTBXL_SUPERCLASSES = {"NORM": "normal ECG", "MI": "myocardial infarction", "STTC": "ST/T change",
                      "CD": "conduction disturbance", "HYP": "hypertrophy"}


@dataclasses.dataclass(frozen=True)
class Finding:
  """One SNOMED CT diagnosis of the challenge tables."""
  code: str
  name: str
  abbreviation: str
  scored: bool


def table_path(name: str):
  """A shipped table (a `Traversable` that `open()`s) by file name."""
  return importlib.resources.files("hubert_ecg_jax.evaluate").joinpath(TABLES, name)


@functools.cache
def findings() -> dict[str, Finding]:
  """SNOMED CT code -> Finding, over the scored and unscored diagnoses."""
  table: dict[str, Finding] = {}
  for name, scored in ((SCORED_TABLE, True), (UNSCORED_TABLE, False)):
    with table_path(name).open(newline="") as stream:
      for row in csv.DictReader(stream):
        code = row["SNOMEDCTCode"].strip()
        table.setdefault(code, Finding(code, row["Dx"].strip(), row["Abbreviation"].strip(), scored))
  return table


@functools.cache
def scored_classes() -> tuple[tuple[str, ...], ...]:
  """The challenge's scored classes in weights.csv order; each is the codes scored as one."""
  with table_path(WEIGHTS_TABLE).open(newline="") as stream:
    header = next(csv.reader(stream))
  return tuple(tuple(entry.split(SEPARATOR)) for entry in header[1:])


def equivalent_codes() -> dict[str, str]:
  """Every code of a class scored as one -> the class's name in weights.csv ('713427006|59118001')."""
  return {code: SEPARATOR.join(codes) for codes in scored_classes() if len(codes) > 1
          for code in codes}


def describe(label: str, descriptions: Mapping[str, str] | None = None) -> Finding | None:
  """The Finding of a label (a code, or 'a|b' codes scored as one), or None if it is not a code.

  `descriptions` (label -> text) names labels of other vocabularies; their abbreviation is the label.
  """
  if descriptions and label in descriptions:
    return Finding(label, descriptions[label], label, False)
  table = findings()
  parts = [table.get(code) for code in str(label).split(SEPARATOR)]
  if not parts or any(part is None for part in parts):
    return None
  if len(parts) == 1:
    return parts[0]
  return Finding(label, " / ".join(dict.fromkeys(p.name for p in parts)),
                 SEPARATOR.join(dict.fromkeys(p.abbreviation for p in parts)),
                 any(p.scored for p in parts))


def ptbxl_descriptions(folder: str | os.PathLike) -> dict[str, str]:
  """PTB-XL statement code -> description, from scp_statements.csv in `folder` (or a folder in it),
  plus the superclass names; {} when the folder holds no scp_statements.csv."""
  if not folder:
    return {}
  candidates = [pathlib.Path(folder) / "scp_statements.csv"] + sorted(
      pathlib.Path(folder).glob("*/scp_statements.csv"))
  path = next((candidate for candidate in candidates if candidate.is_file()), None)
  if path is None:
    return {}
  with path.open(newline="") as stream:
    rows = list(csv.reader(stream))
  if not rows or "description" not in rows[0]:
    raise ValueError(f"{path}: expected PTB-XL's scp_statements.csv with a description column, "
                     f"found columns {rows[0] if rows else []}")
  column = rows[0].index("description")
  return {**PTBXL_SUPERCLASSES, **{row[0]: row[column] for row in rows[1:] if row and row[column]}}


def display_name(label: str, descriptions: Mapping[str, str] | None = None) -> str:
  """'right bundle branch block (RBBB)' for a known label, the label itself otherwise."""
  finding = describe(label, descriptions)
  if finding is None:
    return str(label)
  if finding.abbreviation == finding.code:
    return finding.name
  return f"{finding.name} ({finding.abbreviation})"


def label_table(labels: Sequence[str], descriptions: Mapping[str, str] | None = None
                ) -> list[dict[str, str]]:
  """Per label: {label, abbreviation, name} ('' where the label is not a known finding)."""
  rows = []
  for label in labels:
    finding = describe(label, descriptions)
    rows.append({"label": str(label), "abbreviation": finding.abbreviation if finding else "",
                 "name": finding.name if finding else ""})
  return rows


def is_challenge_vocabulary(labels: Sequence[str]) -> bool:
  """True when at least one label is (or merges) a scored challenge code."""
  scored = {code for codes in scored_classes() for code in codes}
  return any(code in scored for label in labels for code in str(label).split(SEPARATOR))


def resolve_label(query: str, labels: Sequence[str],
                  descriptions: Mapping[str, str] | None = None) -> int:
  """Index of the label `query` names: the label itself, its abbreviation or its name (any case)."""
  wanted = str(query).strip().lower()
  for index, label in enumerate(labels):
    finding = describe(label, descriptions)
    spellings = {str(label).lower()} | ({finding.abbreviation.lower(), finding.name.lower()}
                                        if finding else set())
    if wanted in spellings:
      return index
  raise ValueError(f"no output of the model is {query!r}: expected one of "
                   f"{[display_name(label, descriptions) + f' [{label}]' for label in labels]}")


def merge_equivalent(y_true: np.ndarray | None, y_score: np.ndarray, labels: Sequence[str]
                     ) -> tuple[np.ndarray | None, np.ndarray, list[str]]:
  """Merges the columns of codes the challenge scores as one diagnosis.

  y_true (N, L) or None, y_score (N, L) -> the same with each group of equivalent codes present in
  `labels` replaced by one column named as in weights.csv ('713427006|59118001'): the maximum of the
  group's columns (a record has the diagnosis if it has any of the codes). The merged column takes the
  place of the group's first column; other columns keep their order.
  """
  labels = [str(label) for label in labels]
  groups: dict[str, list[int]] = {}
  order: list[str] = []
  equivalents = equivalent_codes()
  for index, label in enumerate(labels):
    key = equivalents.get(label, label)
    if key not in groups:
      groups[key] = []
      order.append(key)
    groups[key].append(index)
  names = [key if len(groups[key]) > 1 else labels[groups[key][0]] for key in order]

  def merged(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return np.stack([values[:, groups[key]].max(axis=1) for key in order], axis=1)

  return (None if y_true is None else merged(y_true)), merged(y_score), names
