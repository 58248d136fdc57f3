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
from typing import Any

from hubert_ecg_jax.commands import add_compute_dtype_argument, add_missing_leads_argument
from hubert_ecg_jax.files import as_path


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
  data = as_path(args.data)
  out = as_path(args.out)
  if data.is_file() and data.suffix.lower() == ".csv":
    from hubert_ecg_jax.finetune.data import materialise_split_csv

    if not args.records_dir:
      raise ValueError(f"{data} is a split CSV: pass --records-dir, the folder its file names are "
                       "relative to")
    data = materialise_split_csv(data, args.records_dir, out.absolute().parent / f".{out.name}-data",
                                 args.label_start_index, args.fs, args.workers, not args.quiet,
                                 missing_leads=args.missing_leads)
  from hubert_ecg_jax.evaluate.classifier import evaluate_classifier

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
