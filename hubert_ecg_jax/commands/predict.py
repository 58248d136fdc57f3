"""`hubert-ecg-jax predict MODEL FILE_OR_DIR`: what a fine-tuned model finds in ECG files.

Reads one record or every record of a folder (WFDB .hea + .dat/.mat, .npy, .csv, CODE-15 HDF5),
prepares it as the model was trained (band-pass, 500 Hz, min-max to [-1, 1]) whatever its length
and rate, cuts it into aligned 5-s windows (default: as many evenly spaced windows as cover the
record, so a 10-s ECG gives its two halves), runs the model on each and aggregates the windows'
probabilities. A finding is reported where its probability reaches the threshold tuned on the
validation set (0.5 for labels without one). SNOMED CT codes (the CinC 2021 vocabulary) are shown
with their names and abbreviations. Written to OUT (atomically):

  predictions.csv   per record: probability of every label (columns named by code), the findings
                    (codes) and their names, and the leads entered as zeros (--missing-leads zero)
  predictions.json  the same with thresholds, top findings, every label's name and abbreviation,
                    the model's source (Hub commit) and the records that could not be read
  plots/ID.png      with --plot: the 12-lead ECG on ECG paper with the top findings (and with
                    --explain the attribution heat of the explained finding under each lead)
  attributions/ID.npy  with --explain: (windows, 12, 500) attributions of the finding per window,
                    lead and 100-Hz step (hubert_ecg_jax.attributions)
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from hubert_ecg_jax.commands import add_compute_dtype_argument, add_missing_leads_argument


def register(subparsers: Any) -> None:
  p = subparsers.add_parser(
      "predict", help="label probabilities (and ECG plots) for ECG files with a fine-tuned model",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="fine-tuned model directory (workdir/best_model of `finetune`), or a "
                 "Hugging Face Hub id (ORG/NAME[@REVISION]) of a fine-tuned checkpoint")
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
  p.add_argument("--merge-equivalent", action="store_true",
                 help="report the codes the CinC 2021 challenge scores as one diagnosis (e.g. RBBB "
                 "713427006|59118001) as one finding: its probability the highest of its codes, found "
                 "when any of them reaches its threshold")
  p.add_argument("--explain", metavar="FINDING",
                 help="attributions of this finding (code, abbreviation or name) for every record: "
                 "saved under attributions/, summarised per lead in predictions.json, drawn with --plot")
  p.add_argument("--explain-method", choices=("integrated_gradients", "gradient_x_input"),
                 default="integrated_gradients",
                 help="integrated gradients from a zero baseline (default) or gradient x input (cheap)")
  p.add_argument("--explain-steps", type=int, default=128,
                 help="integration steps of integrated gradients (default 128)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  add_missing_leads_argument(p)
  add_compute_dtype_argument(p)
  p.set_defaults(func=run)


def _safe_name(record_id: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id) or "record"


def run(args: argparse.Namespace) -> int:
  import numpy as np

  from hubert_ecg_jax import plots
  from hubert_ecg_jax.commands.evaluate import output_directory
  from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, missing_standard_leads, reorder_leads
  from hubert_ecg_jax.evaluate import aggregate_crops
  from hubert_ecg_jax.evaluate.snomed import display_name, label_table, merge_equivalent
  from hubert_ecg_jax.hub import model_source
  from hubert_ecg_jax.inference import (BatchRunner, classifier_logits_fn, list_input_files,
                                        load_classifier, run_on_files)

  source = model_source(args.model)
  classifier = load_classifier(source["path"], args.compute_dtype)
  task = classifier.task
  names = list(task.output_names)
  descriptions = classifier.metadata.get("label_descriptions")
  explainer = _Explainer(classifier, args) if args.explain else None
  thresholds = (classifier.thresholds if classifier.thresholds is not None
                else np.full(len(names), 0.5))
  if args.merge_equivalent and task.kind != "multi_label":
    raise ValueError(f"--merge-equivalent merges multi-label outputs, this model is {task.kind}")
  shown = merge_equivalent(None, np.zeros((1, len(names))), names)[2] if args.merge_equivalent else names
  readable = {name: display_name(name, descriptions) for name in shown}
  files = list_input_files(args.inputs, [e.strip() for e in args.extensions.split(",") if e.strip()])
  failures: list[dict[str, str]] = []

  def on_error(source: str, reason: str) -> None:
    failures.append({"source": source, "reason": reason})
    print(f"skipped {source}: {reason}", file=sys.stderr)

  runner = BatchRunner(classifier_logits_fn(classifier.model), args.batch_size)
  records: list[dict[str, Any]] = []
  with output_directory(args.out, args.overwrite) as staging:
    for result in run_on_files(runner, classifier.params, files, args.crop, args.crops, args.fs,
                               args.seed, on_error=on_error if len(files) > 1 else None,
                               progress=not args.quiet, missing_leads=args.missing_leads):
      how = args.aggregation if task.kind != "regression" else "mean"
      scores = aggregate_crops(task.probabilities(result.outputs)[None], how)[0]  # (outputs,)
      if task.kind == "multi_label":
        decided = scores >= thresholds  # (outputs,) each code at its own threshold
        if args.merge_equivalent:  # a merged diagnosis: any of its codes, at the highest probability
          merged, merged_scores, _ = merge_equivalent(decided[None], scores[None], names)
          decided, scores = merged[0], merged_scores[0]
        findings = [name for name, positive in zip(shown, decided) if positive]
      elif task.kind == "multi_class":
        findings = [names[int(np.argmax(scores))]]
      else:
        findings = []
      order = np.argsort(-scores, kind="stable")[:args.top]
      top = [(shown[i], float(scores[i])) for i in order] if task.kind != "regression" else []
      record = result.record
      entry = {"record_id": result.record_id, "source": result.source,
               "duration_s": round(record.signal.shape[1] / record.fs, 3),
               "windows": len(result.offsets), "window_offsets_500hz": result.offsets.tolist(),
               "probabilities" if task.kind != "regression" else "values":
                   {name: float(s) for name, s in zip(shown, scores)},
               "findings": findings, "finding_names": [readable[name] for name in findings],
               "top": top, "missing_leads": missing_standard_leads(record.lead_names)}
      heat = explainer.explain(result, entry, staging) if explainer else None
      if args.plot:
        plot_path = staging / "plots" / f"{_safe_name(result.record_id)}.png"
        signal = reorder_leads(record.signal, record.lead_names, args.missing_leads)
        plots.plot_ecg(signal, record.fs, plot_path, lead_names=STANDARD_LEADS,
                       title=f"{result.record_id} ({result.source})"
                       + (f", leads {', '.join(entry['missing_leads'])} missing (zeros)"
                          if entry["missing_leads"] else ""),
                       findings=[(readable[name], p) for name, p in top] or None,
                       max_findings=args.top, heat=heat,
                       heat_label=explainer.heat_label if explainer else None)
        entry["plot"] = f"plots/{plot_path.name}"
      records.append(entry)
    if not records:
      raise ValueError(f"no record of {args.inputs} could be read ({len(failures)} failed, e.g. "
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
    document = {"model": str(args.model), "model_source": source, "task": task.kind,
                "labels": label_table(shown, descriptions), "crop": args.crop,
                "aggregation": args.aggregation,
                "thresholds": ({n: float(t) for n, t in zip(names, thresholds)}
                               if task.kind == "multi_label" else None),
                "records": records, "failures": failures}
    (staging / "predictions.json").write_text(json.dumps(document, indent=1) + "\n")
  print(f"{len(records)} record(s) -> {args.out}" + (f", {len(failures)} skipped" if failures else ""))
  for entry in records[:20]:
    print(f"  {entry['record_id']}: {', '.join(entry['finding_names']) or '-'}"
          + (f" (leads {', '.join(entry['missing_leads'])} missing, entered as zeros)"
             if entry["missing_leads"] else ""))
  return 0


class _Explainer:
  """--explain: attributions of one finding for each record's windows, saved and summarised."""

  def __init__(self, classifier: Any, args: argparse.Namespace):
    from hubert_ecg_jax.attributions import attribution_fn
    from hubert_ecg_jax.evaluate.snomed import display_name, resolve_label
    from hubert_ecg_jax.inference import BatchRunner

    names = list(classifier.task.output_names)
    descriptions = classifier.metadata.get("label_descriptions")
    self.index = resolve_label(args.explain, names, descriptions)
    self.finding = names[self.index]
    self.method, self.steps = args.explain_method, args.explain_steps
    self.missing_leads = args.missing_leads
    attribute = attribution_fn(classifier.model, self.index, self.method, self.steps)
    self.runner = BatchRunner(lambda p, x, m: attribute(p, x, m, 0.0 * x),
                              min(args.batch_size, 16))
    self.params = classifier.params
    self.heat_label = (f"heat: |attribution| of {display_name(self.finding, descriptions)} "
                       f"({self.method.replace('_', ' ')})")

  def explain(self, result: Any, entry: dict[str, Any], staging: Any) -> Any:
    """Saves attributions/ID.npy, adds the per-lead summary to `entry`; returns the record's heat."""
    import numpy as np

    from hubert_ecg_jax.attributions import lead_attributions, lead_shares, record_heat
    from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, prepare_record
    from hubert_ecg_jax.inference import record_windows

    record = result.record
    prepared = prepare_record(record.signal, record.fs, lead_names=record.lead_names,
                              missing_leads=self.missing_leads)
    x, mask = record_windows(prepared, result.offsets)
    values = self.runner(self.params, x, mask)  # (windows, 6000)
    path = staging / "attributions" / f"{_safe_name(result.record_id)}.npy"
    path.parent.mkdir(exist_ok=True)
    np.save(path, lead_attributions(values).astype(np.float32))
    shares = lead_shares(values).mean(axis=0)  # (12,)
    entry["explanation"] = {
        "finding": self.finding, "method": self.method,
        "steps": self.steps if self.method == "integrated_gradients" else None,
        "baseline": "zeros" if self.method == "integrated_gradients" else None,
        "attributions": f"attributions/{path.name}",
        "lead_shares": {lead: round(float(share), 4) for lead, share in zip(STANDARD_LEADS, shares)}}
    return record_heat(values, result.offsets, prepared.shape[1])

