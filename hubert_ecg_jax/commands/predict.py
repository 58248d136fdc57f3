"""`hubert-ecg-jax predict MODEL FILE_OR_DIR`: what a fine-tuned model finds in ECG files.

Reads one record or every record of a folder (WFDB .hea + .dat/.mat, .npy, .csv, CODE-15 HDF5),
prepares it as the model was trained (band-pass, 500 Hz, min-max to [-1, 1]) whatever its length
and rate, cuts it into aligned 5-s windows (default: as many evenly spaced windows as cover the
record, so a 10-s ECG gives its two halves), runs the model on each and aggregates the windows'
probabilities. A finding is reported where its probability reaches the threshold tuned on the
validation set (0.5 for labels without one). Written to OUT (atomically):

  predictions.csv   per record: probability of every label and the findings
  predictions.json  the same with thresholds, top findings and the records that could not be read
  plots/ID.png      with --plot: the 12-lead ECG on ECG paper with the top findings
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from hubert_ecg_jax.commands import add_compute_dtype_argument


def register(subparsers: Any) -> None:
  p = subparsers.add_parser(
      "predict", help="label probabilities (and ECG plots) for ECG files with a fine-tuned model",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="fine-tuned model directory (workdir/best_model of `finetune`)")
  p.add_argument("inputs", metavar="FILE_OR_DIR", help="an ECG file or a folder searched recursively")
  p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument("--crop", choices=("cover", "first", "tta", "random"), default="cover",
                 help="windows per record: enough evenly spaced ones to cover it (default), the "
                 "first 5 s, N evenly spaced (tta) or N seeded random ones")
  p.add_argument("--crops", type=int, default=3, help="windows per record for tta / random")
  p.add_argument("--aggregation", choices=("mean", "max"), default="mean",
                 help="how a record's window probabilities combine (default mean)")
  p.add_argument("--fs", type=float, help="sampling rate in Hz of .npy records (they do not store it)")
  p.add_argument("--extensions", default=".hea,.npy",
                 help="record files to look for in a folder (default .hea,.npy; add .csv if the "
                 "folder holds ECGs as CSV); HDF5 files are always read")
  p.add_argument("--plot", action="store_true", help="also draw each ECG with its top findings")
  p.add_argument("--top", type=int, default=5, help="findings shown per record (default 5)")
  p.add_argument("--batch-size", type=int, default=64, help="windows per device pass (default 64)")
  p.add_argument("--seed", type=int, default=0, help="seed of random crops")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  add_compute_dtype_argument(p)
  p.set_defaults(func=run)


def _safe_name(record_id: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id) or "record"


def run(args: argparse.Namespace) -> int:
  import numpy as np

  from hubert_ecg_jax import plots
  from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, reorder_leads
  from hubert_ecg_jax.evaluate import aggregate_crops
  from hubert_ecg_jax.files import output_folder
  from hubert_ecg_jax.parallel import BatchRunner
  from hubert_ecg_jax.inference import (classifier_logits_fn, list_input_files,
                                        load_classifier, run_on_files)

  classifier = load_classifier(args.model, args.compute_dtype)
  task = classifier.task
  names = list(task.output_names)
  thresholds = (classifier.thresholds if classifier.thresholds is not None
                else np.full(len(names), 0.5))
  files = list_input_files(args.inputs, [e.strip() for e in args.extensions.split(",") if e.strip()])
  failures: list[dict[str, str]] = []

  def on_error(source: str, reason: str) -> None:
    failures.append({"source": source, "reason": reason})
    print(f"skipped {source}: {reason}", file=sys.stderr)

  runner = BatchRunner(classifier_logits_fn(classifier.model), args.batch_size)
  records: list[dict[str, Any]] = []
  with output_folder(args.out, args.overwrite) as staging:
    for result in run_on_files(runner, classifier.params, files, args.crop, args.crops, args.fs,
                               args.seed, on_error=on_error if len(files) > 1 else None,
                               progress=not args.quiet):
      how = args.aggregation if task.kind != "regression" else "mean"
      scores = aggregate_crops(task.probabilities(result.outputs)[None], how)[0]  # (outputs,)
      if task.kind == "multi_label":
        findings = [name for name, s, t in zip(names, scores, thresholds) if s >= t]
      elif task.kind == "multi_class":
        findings = [names[int(np.argmax(scores))]]
      else:
        findings = []
      order = np.argsort(-scores, kind="stable")[:args.top]
      top = [(names[i], float(scores[i])) for i in order] if task.kind != "regression" else []
      record = result.record
      entry = {"record_id": result.record_id, "source": result.source,
               "duration_s": round(record.signal.shape[1] / record.fs, 3),
               "windows": len(result.offsets), "window_offsets_500hz": result.offsets.tolist(),
               "probabilities" if task.kind != "regression" else "values":
                   {name: float(s) for name, s in zip(names, scores)},
               "findings": findings, "top": top}
      if args.plot:
        plot_path = staging / "plots" / f"{_safe_name(result.record_id)}.png"
        signal = reorder_leads(record.signal, record.lead_names)
        plots.plot_ecg(signal, record.fs, plot_path, lead_names=STANDARD_LEADS,
                       title=f"{result.record_id} ({result.source})", findings=top or None,
                       max_findings=args.top)
        entry["plot"] = f"plots/{plot_path.name}"
      records.append(entry)
    if not records:
      raise ValueError(f"no record of {args.inputs} could be read ({len(failures)} failed, e.g. "
                       f"{failures[:2]})")
    key = "probabilities" if task.kind != "regression" else "values"
    with (staging / "predictions.csv").open("w", newline="") as stream:
      writer = csv.writer(stream)
      writer.writerow(["record_id", "source", "duration_s", "windows"] + names + ["findings"])
      for entry in records:
        writer.writerow([entry["record_id"], entry["source"], entry["duration_s"], entry["windows"]]
                        + [f"{entry[key][name]:.6g}" for name in names] + [";".join(entry["findings"])])
    document = {"model": str(args.model), "task": task.kind, "crop": args.crop,
                "aggregation": args.aggregation,
                "thresholds": ({n: float(t) for n, t in zip(names, thresholds)}
                               if task.kind == "multi_label" else None),
                "records": records, "failures": failures}
    (staging / "predictions.json").write_text(json.dumps(document, indent=1) + "\n")
  print(f"{len(records)} record(s) -> {args.out}" + (f", {len(failures)} skipped" if failures else ""))
  for entry in records[:20]:
    print(f"  {entry['record_id']}: {', '.join(entry['findings']) or '-'}")
  return 0

