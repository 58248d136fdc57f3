"""`hubert-ecg-jax labels-template FOLDER`: the labels CSV of a folder of records, ready to fill in."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "labels-template", help="write the labels CSV template for a folder of ECG records",
      description="Finds the records under FOLDER (WFDB .hea, .npy; .csv with --extensions) and writes a "
      "CSV with one row per record: 'record' (path relative to FOLDER), 'fs' (only when some records are "
      "not WFDB: fill in their rate), 'split' (with --with-split), then one column per label. Label "
      "columns are the --labels you name plus every '# Dx:' SNOMED code found in the WFDB headers; "
      "records with '# Dx:' codes get 1/0 there, every other cell is left empty for you to fill in. "
      "The filled CSV is what the EcgFolder TFDS builder reads.")
  p.add_argument("folder", help="folder of ECG records (searched recursively)")
  p.add_argument("--out", default=None, help="where to write the CSV (default FOLDER/labels.csv)")
  p.add_argument("--labels", default="", help="comma-separated label names to add as columns, e.g. AF,RBBB")
  p.add_argument("--with-split", action="store_true",
                 help="add an empty 'split' column (train / validation / test) to fill in")
  p.add_argument("--extensions", default=".hea,.npy",
                 help="comma-separated record file types to list (default .hea,.npy; add .csv for CSV records)")
  p.add_argument("--force", action="store_true", help="overwrite the CSV if it exists")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  import csv

  from hubert_ecg_jax.data.tfds_folder import write_labels_template

  labels = [name.strip() for name in args.labels.split(",") if name.strip()]
  extensions = [ext.strip() for ext in args.extensions.split(",") if ext.strip()]
  out = write_labels_template(args.folder, args.out, labels=labels, with_split=args.with_split,
                              extensions=extensions, overwrite=args.force)
  with open(out, newline="") as handle:
    header, *rows = list(csv.reader(handle))
  empty = sum(cell == "" for row in rows for cell in row[header.index("record") + 1:])
  print(f"wrote {out}: {len(rows)} records, columns {header}; {empty} empty cells to fill in")
  return 0
