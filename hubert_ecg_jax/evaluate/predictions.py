"""What a fine-tuned classifier finds in ECG files: the report of `hubert-ecg-jax predict` (its help
lists the files written)."""
from __future__ import annotations

import csv
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from hubert_ecg_jax.attributions import (attribution_fn, lead_attributions, lead_shares,
                                         record_heat)
from hubert_ecg_jax.config import STANDARD_LEADS
from hubert_ecg_jax.data.preprocess import missing_standard_leads, prepare_record, reorder_leads
from hubert_ecg_jax.evaluate.report import aggregate_crops
from hubert_ecg_jax.evaluate.snomed import display_name, label_table, merge_equivalent, resolve_label
from hubert_ecg_jax.files import AnyPath, output_folder
from hubert_ecg_jax.hub import model_source
from hubert_ecg_jax.inference import (Classifier, FileResult, classifier_logits_fn, list_input_files,
                                      load_classifier, record_windows, run_on_files)
from hubert_ecg_jax.parallel import BatchRunner


def _safe_name(record_id: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id) or "record"


def predict_files(model: str | pathlib.Path, inputs: str | pathlib.Path, out: str | pathlib.Path,
                  crop: str = "cover", crops: int = 3, aggregation: str = "mean",
                  fs: float | None = None, extensions: Sequence[str] = (".hea", ".npy"),
                  plot: bool = False, top: int = 5, batch_size: int = 64, seed: int = 0,
                  overwrite: bool = False, progress: bool = True, compute_dtype: str | None = None,
                  missing_leads: str = "refuse", merge_equivalent_codes: bool = False,
                  explain: str | None = None, explain_method: str = "integrated_gradients",
                  explain_steps: int = 128) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
  """Predicts every record of `inputs` and writes OUT; returns (records, failures) as written.

  `merge_equivalent_codes` reports the codes the CinC 2021 challenge scores as one diagnosis as
  one finding; `explain` (a code, abbreviation or name) adds attributions of that finding."""
  from hubert_ecg_jax import plots  # matplotlib: optional until an ECG is drawn

  source = model_source(model)
  classifier = load_classifier(source["path"], compute_dtype)
  task = classifier.task
  names = list(task.output_names)
  descriptions = classifier.metadata.get("label_descriptions")
  explainer = (_Explainer(classifier, explain, explain_method, explain_steps, batch_size,
                          missing_leads) if explain else None)
  thresholds = (classifier.thresholds if classifier.thresholds is not None
                else np.full(len(names), 0.5))
  if merge_equivalent_codes and task.kind != "multi_label":
    raise ValueError(f"--merge-equivalent merges multi-label outputs, this model is {task.kind}")
  shown = (merge_equivalent(None, np.zeros((1, len(names))), names)[2] if merge_equivalent_codes
           else names)
  readable = {name: display_name(name, descriptions) for name in shown}
  files = list_input_files(inputs, extensions)
  failures: list[dict[str, str]] = []

  def on_error(source: str, reason: str) -> None:
    failures.append({"source": source, "reason": reason})
    print(f"skipped {source}: {reason}", file=sys.stderr)

  runner = BatchRunner(classifier_logits_fn(classifier.model), batch_size)
  records: list[dict[str, Any]] = []
  with output_folder(out, overwrite) as staging:
    for result in run_on_files(runner, classifier.params, files, crop, crops, fs,
                               seed, on_error=on_error if len(files) > 1 else None,
                               progress=progress, missing_leads=missing_leads):
      how = aggregation if task.kind != "regression" else "mean"
      scores = aggregate_crops(task.probabilities(result.outputs)[None], how)[0]  # (outputs,)
      if task.kind == "multi_label":
        decided = scores >= thresholds  # (outputs,) each code at its own threshold
        if merge_equivalent_codes:  # a merged diagnosis: any of its codes, at the highest probability
          merged, merged_scores, _ = merge_equivalent(decided[None], scores[None], names)
          decided, scores = merged[0], merged_scores[0]
        findings = [name for name, positive in zip(shown, decided) if positive]
      elif task.kind == "multi_class":
        findings = [names[int(np.argmax(scores))]]
      else:
        findings = []
      order = np.argsort(-scores, kind="stable")[:top]
      ranked = [(shown[i], float(scores[i])) for i in order] if task.kind != "regression" else []
      record = result.record
      entry = {"record_id": result.record_id, "source": result.source,
               "duration_s": round(record.signal.shape[1] / record.fs, 3),
               "windows": len(result.offsets), "window_offsets_500hz": result.offsets.tolist(),
               "probabilities" if task.kind != "regression" else "values":
                   {name: float(s) for name, s in zip(shown, scores)},
               "findings": findings, "finding_names": [readable[name] for name in findings],
               "top": ranked, "missing_leads": missing_standard_leads(record.lead_names)}
      heat = explainer.explain(result, entry, staging) if explainer else None
      if plot:
        plot_path = staging / "plots" / f"{_safe_name(result.record_id)}.png"
        signal = reorder_leads(record.signal, record.lead_names, missing_leads)
        missing_note = (f", leads {', '.join(entry['missing_leads'])} missing (zeros)"
                        if entry["missing_leads"] else "")
        plots.plot_ecg(signal, record.fs, plot_path, lead_names=STANDARD_LEADS,
                       title=f"{result.record_id} ({result.source}){missing_note}",
                       findings=[(readable[name], p) for name, p in ranked] or None,
                       max_findings=top, heat=heat,
                       heat_label=explainer.heat_label if explainer else None)
        entry["plot"] = f"plots/{plot_path.name}"
      records.append(entry)
    if not records:
      raise ValueError(f"no record of {inputs} could be read ({len(failures)} failed, e.g. "
                       f"{failures[:2]})")
    key = "probabilities" if task.kind != "regression" else "values"
    with (staging / "predictions.csv").open("w", newline="") as stream:
      writer = csv.writer(stream)
      writer.writerow(["record_id", "source", "duration_s", "windows"] + shown
                      + ["findings", "finding_names", "missing_leads"])
      for entry in records:
        writer.writerow([entry["record_id"], entry["source"], entry["duration_s"], entry["windows"]]
                        + [f"{entry[key][name]:.6g}" for name in shown]
                        + [";".join(entry[field]) for field in ("findings", "finding_names",
                                                                "missing_leads")])
    document = {"model": str(model), "model_source": source, "task": task.kind,
                "labels": label_table(shown, descriptions), "crop": crop,
                "aggregation": aggregation,
                "thresholds": ({n: float(t) for n, t in zip(names, thresholds)}
                               if task.kind == "multi_label" else None),
                "records": records, "failures": failures}
    (staging / "predictions.json").write_text(json.dumps(document, indent=1) + "\n")
  return records, failures


class _Explainer:
  """--explain: attributions of one finding for each record's windows, saved and summarised."""

  def __init__(self, classifier: Classifier, finding: str, method: str, steps: int,
               batch_size: int, missing_leads: str):
    names = list(classifier.task.output_names)
    descriptions = classifier.metadata.get("label_descriptions")
    self.index = resolve_label(finding, names, descriptions)
    self.finding = names[self.index]
    self.method, self.steps, self.missing_leads = method, steps, missing_leads
    attribute = attribution_fn(classifier.model, self.index, method, steps)
    self.runner = BatchRunner(lambda p, x, m: attribute(p, x, m, 0.0 * x), min(batch_size, 16))
    self.params = classifier.params
    self.heat_label = (f"heat: |attribution| of {display_name(self.finding, descriptions)} "
                       f"({method.replace('_', ' ')})")

  def explain(self, result: FileResult, entry: dict[str, Any], staging: AnyPath) -> np.ndarray:
    """Saves attributions/ID.npy, adds the per-lead summary to `entry`; returns the record's heat."""
    record = result.record
    prepared = prepare_record(record.signal, record.fs, lead_names=record.lead_names,
                              missing_leads=self.missing_leads)
    x, mask = record_windows(prepared, result.offsets)
    values = self.runner(self.params, x, mask)  # (windows, 6000)
    path = staging / "attributions" / f"{_safe_name(result.record_id)}.npy"
    path.parent.mkdir(exist_ok=True)
    with path.open("wb") as stream:
      np.save(stream, lead_attributions(values).astype(np.float32))
    shares = lead_shares(values).mean(axis=0)  # (12,)
    entry["explanation"] = {
        "finding": self.finding, "method": self.method,
        "steps": self.steps if self.method == "integrated_gradients" else None,
        "baseline": "zeros" if self.method == "integrated_gradients" else None,
        "attributions": f"attributions/{path.name}",
        "lead_shares": {lead: round(float(share), 4) for lead, share in zip(STANDARD_LEADS, shares)}}
    return record_heat(values, result.offsets, prepared.shape[1])
