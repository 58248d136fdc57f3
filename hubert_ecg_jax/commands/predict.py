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


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.evaluate.predictions import predict_files

  records, failures = predict_files(
      args.model, args.inputs, args.out, args.crop, args.crops, args.aggregation, args.fs,
      [e.strip() for e in args.extensions.split(",") if e.strip()], args.plot, args.top,
      args.batch_size, args.seed, args.overwrite, progress=not args.quiet,
      compute_dtype=args.compute_dtype, missing_leads=args.missing_leads,
      merge_equivalent_codes=args.merge_equivalent, explain=args.explain,
      explain_method=args.explain_method, explain_steps=args.explain_steps)
  print(f"{len(records)} record(s) -> {args.out}" + (f", {len(failures)} skipped" if failures else ""))
  for entry in records[:20]:
    print(f"  {entry['record_id']}: {', '.join(entry['finding_names']) or '-'}"
          + (f" (leads {', '.join(entry['missing_leads'])} missing, entered as zeros)"
             if entry["missing_leads"] else ""))
  return 0
