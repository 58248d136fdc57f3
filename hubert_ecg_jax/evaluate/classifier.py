"""Evaluating a fine-tuned classifier on a records directory: the report of `hubert-ecg-jax evaluate`
(its help lists the files written)."""
from __future__ import annotations

import csv
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from hubert_ecg_jax.config import STANDARD_LEADS
from hubert_ecg_jax.evaluate import snomed
from hubert_ecg_jax.evaluate.challenge import challenge_score
from hubert_ecg_jax.evaluate.metrics import multiclass_metrics, regression_metrics
from hubert_ecg_jax.evaluate.report import (aggregate_crops, evaluate_multilabel, format_table,
                                            write_csv, write_json)
from hubert_ecg_jax.files import output_folder
from hubert_ecg_jax.hub import model_source
from hubert_ecg_jax.inference import classifier_logits_fn, load_classifier, run_on_records_dir
from hubert_ecg_jax.lead_subsets import keep_leads, parse_leads
from hubert_ecg_jax.parallel import BatchRunner


def _write_rows(path: pathlib.Path, header: list[str], rows: list[list[Any]]) -> None:
  with path.open("w", newline="") as stream:
    writer = csv.writer(stream)
    writer.writerow(header)
    writer.writerows(rows)


def evaluate_classifier(model_path: str | os.PathLike, data_dir: str | os.PathLike,
                        out: str | os.PathLike, crop: str = "first", crops: int = 1,
                        aggregation: str = "max", n_boot: int = 1000, seed: int = 0,
                        batch_size: int = 64, overwrite: bool = False, progress: bool = True,
                        compute_dtype: str | None = None, leads: Sequence[str] | None = None,
                        merge_equivalent: bool = False) -> dict[str, Any]:
  """Evaluates the classifier at `model_path` on a records directory; writes OUT; returns the summary
  (`table` holds the text table). `leads` keeps only those leads (`lead_subsets.keep_leads`);
  `merge_equivalent` merges the challenge's equivalent codes (`snomed.merge_equivalent`: max of the
  probabilities and of the labels; the tuned thresholds are per code, so the merged report gives the
  metrics at 0.5 only)."""
  from hubert_ecg_jax import plots  # matplotlib: optional until a report is drawn

  source = model_source(model_path)
  classifier = load_classifier(source["path"], compute_dtype)
  task = classifier.task
  if aggregation not in ("mean", "max"):
    raise ValueError(f"aggregation must be mean or max, found {aggregation!r}")
  if merge_equivalent and task.kind != "multi_label":
    raise ValueError(f"--merge-equivalent merges multi-label outputs, this model is {task.kind}")
  logits_fn = classifier_logits_fn(classifier.model)
  leads = parse_leads(leads) if leads else None
  runner = BatchRunner(keep_leads(logits_fn, leads) if leads else logits_fn, batch_size)
  result = run_on_records_dir(runner, classifier.params, data_dir, crop, crops, seed, progress)
  missing = [name for name in task.source_columns if name not in result.label_names]
  targets = task.targets(result.labels, result.label_names, allow_missing=task.kind == "multi_label")
  how = aggregation if task.kind != "regression" else "mean"
  scores = aggregate_crops(task.probabilities(result.outputs), how)  # (records, outputs)
  names = list(task.output_names)
  summary: dict[str, Any] = {
      "model": str(model_path), "data": str(data_dir), "task": task.kind,
      "n_records": len(result.record_ids), "crop": crop, "crops": result.outputs.shape[1],
      "aggregation": how, "labels_missing_from_data": missing, "model_source": source,
      "leads": list(leads or STANDARD_LEADS),
      "zeroed_leads": [lead for lead in STANDARD_LEADS if leads and lead not in leads]}
  descriptions = classifier.metadata.get("label_descriptions")
  with output_folder(out, overwrite) as staging:
    _write_rows(staging / "predictions.csv", ["record_id"] + names,
                [[rid] + [f"{v:.6g}" for v in row] for rid, row in zip(result.record_ids, scores)])
    if task.kind == "regression":
      metrics = regression_metrics(targets, scores, names)
      summary["regression"] = metrics.to_dict()
      rows = [[name] + [float(metrics.per_target[m][i]) for m in ("mse", "mae", "r2")]
              for i, name in enumerate(names)]
      _write_rows(staging / "metrics.csv", ["target", "mse", "mae", "r2"], rows)
      width = max(len(name) for name in names + ["target"])
      lines = [f"{'target':<{width}}  {'mse':>10}  {'mae':>10}  {'r2':>10}"]
      for row in rows + [["mean", metrics.mse, metrics.mae, metrics.r2]]:
        lines.append(f"{row[0]:<{width}}  " + "  ".join(f"{value:>10.4g}" for value in row[1:]))
      table = "\n".join(lines)
    else:
      one_vs_rest = targets if task.kind == "multi_label" else np.eye(len(names))[targets]
      thresholds = classifier.thresholds if task.kind == "multi_label" else None
      if task.kind == "multi_label" and snomed.is_challenge_vocabulary(names):
        decisions = scores >= (thresholds if thresholds is not None else 0.5)
        summary["challenge"] = challenge_score(targets, decisions, names).to_dict()
        summary["challenge"]["thresholds"] = "tuned" if thresholds is not None else "0.5"
      if merge_equivalent:
        one_vs_rest, scores, names = snomed.merge_equivalent(one_vs_rest, scores, names)
        thresholds = None
        summary["merged_equivalent_codes"] = [name for name in names if snomed.SEPARATOR in name]
      summary["labels"] = snomed.label_table(names, descriptions)
      findings = {row["label"]: (row["abbreviation"], row["name"]) for row in summary["labels"]}
      evaluation = evaluate_multilabel(one_vs_rest, scores, names, thresholds=thresholds,
                                       n_boot=n_boot, seed=seed)
      summary["evaluation"] = evaluation.to_dict()
      if task.kind == "multi_class":
        summary["multiclass"] = multiclass_metrics(targets, scores, names).to_dict()
      write_csv(evaluation, staging / "metrics.csv", findings)
      table = format_table(evaluation, findings)
      if "challenge" in summary:
        challenge = summary["challenge"]
        table += (f"\nCinC 2021 challenge score {challenge['score']:.3f} over "
                  f"{len(challenge['classes'])} scored classes (thresholds "
                  f"{challenge['thresholds']})")
      if leads:
        table += f"\nleads: {', '.join(leads)} only (zeroed: {', '.join(summary['zeroed_leads'])})"
      per_label = evaluation.metrics.per_label["auroc"]
      shown_names = [snomed.display_name(name, descriptions) for name in names]
      if np.isfinite(per_label).any():
        plots.plot_roc_curves(one_vs_rest, scores, staging / "roc.png", shown_names)
        interval = evaluation.intervals.get("auroc")
        plots.plot_label_auroc(per_label, staging / "auroc.png", shown_names,
                               None if interval is None else interval.per_label.lower,
                               None if interval is None else interval.per_label.upper)
      else:
        summary["note"] = "no label has both classes in the data: no ROC curves"
    write_json(summary, staging / "metrics.json")
  summary["table"] = table
  return summary
