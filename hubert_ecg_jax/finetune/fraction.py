"""Label-efficiency runs: fine-tuning or probing on a seeded, label-stratified fraction of the training set.

`--config.data.train_fraction=0.1 --config.data.fraction_seed=0` trains on about a tenth of the
training records, chosen by `stratified_fraction` so that every label keeps about a tenth of its
positives; validation and test splits stay whole. The subset is written once as a records directory
under `workdir/data/` and reused.

`stratified_fraction` is iterative stratification (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011)
for two parts, the subset (fraction f) and the rest (1 - f). Each part wants f (resp. 1 - f) of
every label's positives and of the records. Labels are taken rarest first (among records not yet
placed); each record holding the label goes to the part that still wants most of that label, ties
to the part that wants most records, then at random; the record's other labels count as placed in
that part too. Records without any label then go to the part that wants most records. For a
single-label task (one-hot rows) this is stratified sampling: each class gives f of its records,
rounded. Regression tasks have no strata: a uniform random draw of round(f N) records.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.files import as_path
from hubert_ecg_jax.finetune.data import _reusable, read_labels


def stratified_fraction(strata: Any, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of the subset: strata (N, L) 0/1 (L may be 0), about fraction * N records."""
  strata = np.asarray(strata) > 0.5
  if strata.ndim != 2:
    raise ValueError(f"expected strata of shape (records, labels), found {strata.shape}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"train_fraction must lie in (0, 1], found {fraction}")
  count = len(strata)
  rng = np.random.default_rng(seed)
  order = rng.permutation(count)  # the order records are considered in (the seed's effect)
  shares = np.array([fraction, 1.0 - fraction])
  wanted_labels = shares[:, None] * strata.sum(axis=0)[None, :]  # (2, L)
  wanted_records = shares * count  # (2,)
  part = np.full(count, -1)

  def place(record: int, label: int | None) -> None:
    wants = wanted_labels[:, label] if label is not None else wanted_records
    best = np.flatnonzero(wants == wants.max())
    if len(best) > 1 and label is not None:
      best = best[wanted_records[best] == wanted_records[best].max()]
    chosen = int(rng.choice(best)) if len(best) > 1 else int(best[0])
    part[record] = chosen
    wanted_labels[chosen] -= strata[record]
    wanted_records[chosen] -= 1

  while True:
    unplaced = strata[order][part[order] < 0]  # (unplaced, L)
    remaining = unplaced.sum(axis=0)
    if not remaining.any():
      break
    label = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(np.int64).max)))
    for record in order[(part[order] < 0) & strata[order, label]]:
      place(int(record), label)
  for record in order[part[order] < 0]:
    place(int(record), None)
  chosen = np.flatnonzero(part == 0)
  if len(chosen) == 0:  # a tiny fraction of a tiny set: keep one record rather than none
    chosen = order[:1]
  return np.sort(chosen)


def task_strata(task: Any, targets: np.ndarray) -> np.ndarray:
  """The strata of a task's targets: multi-label rows, one-hot classes, none for regression."""
  if task.kind == "multi_label":
    return targets
  if task.kind == "multi_class":
    return np.eye(task.num_outputs)[targets]
  return np.zeros((len(targets), 0))


def subset_training_split(train_dir: pathlib.Path, task: Any, labels: np.ndarray,
                          column_names: list[str], fraction: float, seed: int,
                          workdir: pathlib.Path) -> tuple[pathlib.Path, np.ndarray, str]:
  """Writes the stratified fraction of `train_dir` under `workdir/data/`; returns its directory,
  its labels (rows of `labels`, in file order) and a note for the run's log."""
  ids, _, _ = read_labels(train_dir)
  chosen = stratified_fraction(task_strata(task, task.targets(labels, column_names)), fraction, seed)
  directory = workdir / "data" / f"train_fraction-{fraction:g}-seed{seed}"
  job = {"source": "train_fraction", "train": str(as_path(train_dir).absolute()),
         "fraction": fraction, "seed": seed, "records": len(chosen)}
  if not _reusable(directory, job):
    wanted = {ids[i] for i in chosen}
    subset = (record for record in records_lib.iterate_records(train_dir) if record.record_id in wanted)
    records_lib.write_records(directory, subset, column_names, job=job)
  note = (f"training on {len(chosen)} of {len(ids)} records (train_fraction {fraction:g}, "
          f"fraction_seed {seed}, label-stratified) in {directory}")
  return directory, labels[chosen], note
