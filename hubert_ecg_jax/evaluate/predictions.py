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

from hubert_ecg_jax.config import STANDARD_LEADS
from hubert_ecg_jax.data.preprocess import reorder_leads
from hubert_ecg_jax.evaluate.report import aggregate_crops
from hubert_ecg_jax.files import output_folder
from hubert_ecg_jax.inference import (classifier_logits_fn, list_input_files, load_classifier,
                                      run_on_files)
from hubert_ecg_jax.parallel import BatchRunner


def _safe_name(record_id: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id) or "record"


def predict_files(model: str | pathlib.Path, inputs: str | pathlib.Path, out: str | pathlib.Path,
                  crop: str = "cover", crops: int = 3, aggregation: str = "mean",
                  fs: float | None = None, extensions: Sequence[str] = (".hea", ".npy"),
                  plot: bool = False, top: int = 5, batch_size: int = 64, seed: int = 0,
                  overwrite: bool = False, progress: bool = True, compute_dtype: str | None = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
  """Predicts every record of `inputs` and writes OUT; returns (records, failures) as written."""
  from hubert_ecg_jax import plots  # matplotlib: optional until an ECG is drawn

  classifier = load_classifier(model, compute_dtype)
  task = classifier.task
  names = list(task.output_names)
  thresholds = (classifier.thresholds if classifier.thresholds is not None
                else np.full(len(names), 0.5))
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
                               progress=progress):
      how = aggregation if task.kind != "regression" else "mean"
      scores = aggregate_crops(task.probabilities(result.outputs)[None], how)[0]  # (outputs,)
      if task.kind == "multi_label":
        findings = [name for name, s, t in zip(names, scores, thresholds) if s >= t]
      elif task.kind == "multi_class":
        findings = [names[int(np.argmax(scores))]]
      else:
        findings = []
      order = np.argsort(-scores, kind="stable")[:top]
      ranked = [(names[i], float(scores[i])) for i in order] if task.kind != "regression" else []
      record = result.record
      entry = {"record_id": result.record_id, "source": result.source,
               "duration_s": round(record.signal.shape[1] / record.fs, 3),
               "windows": len(result.offsets), "window_offsets_500hz": result.offsets.tolist(),
               "probabilities" if task.kind != "regression" else "values":
                   {name: float(s) for name, s in zip(names, scores)},
               "findings": findings, "top": ranked}
      if plot:
        plot_path = staging / "plots" / f"{_safe_name(result.record_id)}.png"
        signal = reorder_leads(record.signal, record.lead_names)
        plots.plot_ecg(signal, record.fs, plot_path, lead_names=STANDARD_LEADS,
                       title=f"{result.record_id} ({result.source})", findings=ranked or None,
                       max_findings=top)
        entry["plot"] = f"plots/{plot_path.name}"
      records.append(entry)
    if not records:
      raise ValueError(f"no record of {inputs} could be read ({len(failures)} failed, e.g. "
                       f"{failures[:2]})")
    key = "probabilities" if task.kind != "regression" else "values"
    with (staging / "predictions.csv").open("w", newline="") as stream:
      writer = csv.writer(stream)
      writer.writerow(["record_id", "source", "duration_s", "windows"] + names + ["findings"])
      for entry in records:
        writer.writerow([entry["record_id"], entry["source"], entry["duration_s"], entry["windows"]]
                        + [f"{entry[key][name]:.6g}" for name in names] + [";".join(entry["findings"])])
    document = {"model": str(model), "task": task.kind, "crop": crop,
                "aggregation": aggregation,
                "thresholds": ({n: float(t) for n, t in zip(names, thresholds)}
                               if task.kind == "multi_label" else None),
                "records": records, "failures": failures}
    (staging / "predictions.json").write_text(json.dumps(document, indent=1) + "\n")
  return records, failures
