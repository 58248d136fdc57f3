"""`hubert-ecg-jax evaluate MODEL DATA`: the field's metrics of a fine-tuned classifier on a test set.

DATA is a records directory (`hubert-ecg-jax preprocess` output) or one of the original's split
CSVs (with --records-dir). Labels are matched to the model's outputs by name; a label the data
lacks, or that has one class in it, is reported as undefined. SNOMED CT codes are shown with their
names and abbreviations; for labels that are CinC 2021 challenge codes the challenge score (the
reward-matrix metric of weights.csv, `evaluate.challenge`) is computed at the thresholds tuned on
validation (0.5 without). --merge-equivalent merges codes the challenge scores as one diagnosis
(RBBB 713427006|59118001, ...); --leads I,II,... runs the model on those leads only (the others
zeroed) to measure what losing leads costs. Written to OUT (atomically):

  metrics.json      every metric, per label and macro, with bootstrap intervals, Fmax and the
                    challenge score, each label's name and abbreviation
  metrics.csv       one row per label (code, abbreviation, name) and a macro row (AUROC, AUPRC,
                    F1 / sensitivity / specificity at 0.5 and at the thresholds tuned on validation,
                    CIs)
  predictions.csv   per record: the aggregated probability of each output
  roc.png, auroc.png  ROC curves and the per-label AUROC chart (classification)

Multi-class models are reported one-vs-rest as above plus accuracy; regression models as MSE, MAE
and R2 per target. The table goes to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from hubert_ecg_jax.commands import add_compute_dtype_argument, add_missing_leads_argument


@contextlib.contextmanager
def output_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """A staging folder that becomes `out` when the block succeeds (nothing half-written is left)."""
  out = pathlib.Path(out)
  if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} already exists: choose another output folder or pass --overwrite")
  out.absolute().parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.absolute().parent))
  try:
    yield staging
    if out.exists():
      shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


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
  import numpy as np

  from hubert_ecg_jax import plots
  from hubert_ecg_jax.data.preprocess import STANDARD_LEADS
  from hubert_ecg_jax.evaluate import (aggregate_crops, evaluate_multilabel, format_table,
                                       multiclass_metrics, regression_metrics, write_csv, write_json)
  from hubert_ecg_jax.evaluate import snomed
  from hubert_ecg_jax.evaluate.challenge import challenge_score
  from hubert_ecg_jax.hub import model_source
  from hubert_ecg_jax.inference import BatchRunner, classifier_logits_fn, load_classifier, run_on_records_dir
  from hubert_ecg_jax.lead_subsets import keep_leads, parse_leads

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
  with output_directory(out, overwrite) as staging:
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


def register(subparsers: Any) -> None:
  p = subparsers.add_parser(
      "evaluate", help="metrics, bootstrap intervals and plots of a fine-tuned model on a test set",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="fine-tuned model directory (workdir/best_model of `finetune`), or a "
                 "Hugging Face Hub id (ORG/NAME[@REVISION]) of a fine-tuned checkpoint")
  p.add_argument("data", help="records directory (`preprocess` output), or a split CSV with --records-dir")
  p.add_argument("--out", default="evaluation", help="output folder (default: ./evaluation)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument("--crop", choices=("first", "tta", "random"), default="first",
                 help="windows per record: the first 5 s (default, as the original), N evenly spaced "
                 "(tta), or N seeded random ones (the original's TTA)")
  p.add_argument("--crops", type=int, default=3, help="windows per record for tta / random (default 3)")
  p.add_argument("--aggregation", choices=("mean", "max"), default="max",
                 help="how a record's window probabilities combine (default max, as the original)")
  p.add_argument("--n-boot", type=int, default=1000,
                 help="bootstrap resamples for the 95%% intervals (0: none; default 1000)")
  p.add_argument("--seed", type=int, default=0, help="seed of random crops and the bootstrap")
  p.add_argument("--batch-size", type=int, default=64, help="windows per device pass (default 64)")
  p.add_argument("--records-dir", help="split CSV input: folder its file names are relative to (the "
                 "prepared records are kept in .OUT-data beside OUT and reused)")
  p.add_argument("--label-start-index", type=int, default=3,
                 help="split CSV input: column of the first label (3; 4 for PTB-XL and SPH)")
  p.add_argument("--fs", type=float, help="split CSV input: sampling rate of .npy / .csv records")
  p.add_argument("--workers", type=int, default=0,
                 help="split CSV input: processes preparing the records (default: all cores)")
  p.add_argument("--leads", help="comma-separated leads the model sees (e.g. I,II,V1); the others "
                 "are zeroed, to measure what losing leads costs (default: all 12)")
  p.add_argument("--merge-equivalent", action="store_true",
                 help="merge the codes the CinC 2021 challenge scores as one diagnosis (e.g. RBBB "
                 "713427006|59118001) into one label before computing the metrics")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  add_missing_leads_argument(p)
  add_compute_dtype_argument(p)
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  data = pathlib.Path(args.data)
  out = pathlib.Path(args.out)
  if data.is_file() and data.suffix.lower() == ".csv":
    from hubert_ecg_jax.finetune.data import materialise_split_csv

    if not args.records_dir:
      raise ValueError(f"{data} is a split CSV: pass --records-dir, the folder its file names are "
                       "relative to")
    data = materialise_split_csv(data, args.records_dir, out.absolute().parent / f".{out.name}-data",
                                 args.label_start_index, args.fs, args.workers, not args.quiet,
                                 missing_leads=args.missing_leads)
  summary = evaluate_classifier(args.model, data, out, args.crop, args.crops, args.aggregation,
                                args.n_boot, args.seed, args.batch_size, args.overwrite,
                                progress=not args.quiet, compute_dtype=args.compute_dtype,
                                leads=args.leads.split(",") if args.leads else None,
                                merge_equivalent=args.merge_equivalent)
  print(summary["table"])
  if summary["labels_missing_from_data"]:
    print(f"labels of the model missing from the data (all negative there): "
          f"{summary['labels_missing_from_data']}")
  print(f"{summary['n_records']} records, {summary['crops']} window(s) each -> {out}")
  return 0
