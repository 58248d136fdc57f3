"""`hubert-ecg-jax preprocess`: ECG records -> sharded TFRecord files of 500 Hz prepared signals.

Records are listed (a folder searched recursively for `.hea`, `.npy` and CODE-15 HDF5 `.hdf5`/`.h5`
files, one CODE-15 HDF5 file, or a CSV whose first column names the files; each exam of an HDF5 file
is one record, `<file name>/<exam_id>`), permuted with a fixed seed and split into contiguous shard
blocks, so the assignment of records to shards depends only on the list of records and the shard
count. Worker processes (one per core) read, prepare (`prepare_record`: band-pass, resample,
min-max; an HDF5 exam is read alone, by its row) and serialize records; the main process writes
each shard atomically and then records it as finished in `manifest.json`. A rerun with the same
arguments skips finished shards; a rerun with different ones is refused. Bad records are reported on stderr and in the manifest's
`failures`, and the job carries on.
"""
from __future__ import annotations

import argparse
from typing import Any

from hubert_ecg_jax.commands import add_missing_leads_argument


def register(subparsers: Any) -> None:
  p = subparsers.add_parser(
      "preprocess", help="prepare ECG records into sharded TFRecord files (resumable)",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="a folder of records (.hea WFDB, .npy, CODE-15 .hdf5/.h5: one "
                 "record per exam), one CODE-15 HDF5 file, or a CSV listing records (first column "
                 "the file, relative to the CSV's folder; labels from --label-start-index)")
  p.add_argument("out", help="output folder for the shards and manifest.json")
  p.add_argument("--labels", help="CSV of labels (filename, metadata..., label columns), matched to "
                 "records by file name without extension (CODE-15 exams: the first column is the "
                 "exam_id)")
  p.add_argument("--label-source", choices=("dx", "csv"),
                 help="labels from WFDB '# Dx:' SNOMED codes or from CSV columns "
                 "(default: csv when a CSV is given, else dx)")
  p.add_argument("--label-start-index", type=int, default=3,
                 help="column of the first label in the CSV (3; 4 for PTB-XL and SPH)")
  sharding = p.add_mutually_exclusive_group()
  sharding.add_argument("--shards", type=int, help="number of shard files")
  sharding.add_argument("--records-per-shard", type=int,
                        help="records per shard file (default 512)")  # data.ingest.DEFAULT_RECORDS_PER_SHARD
  p.add_argument("--workers", type=int, default=None,
                 help="worker processes (default: all CPU cores)")
  p.add_argument("--order", choices=("resample_first", "filter_first"), default="resample_first",
                 help="filter/resample order (resample_first: as for the released weights)")
  p.add_argument("--nan-policy", choices=("refuse", "interpolate"), default="refuse",
                 help="records with NaN samples: report as bad, or fill linearly in time")
  add_missing_leads_argument(p)
  p.add_argument("--fs", type=float, help="sampling rate in Hz of .npy records (they do not store it)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.data.ingest import preprocess_records

  manifest = preprocess_records(
      args.src, args.out, labels_csv=args.labels, label_source=args.label_source,
      label_start_index=args.label_start_index, num_shards=args.shards,
      records_per_shard=args.records_per_shard, workers=args.workers, order=args.order,
      nan_policy=args.nan_policy, fs=args.fs, show_progress=not args.quiet,
      missing_leads=args.missing_leads)
  zeroed = manifest.preprocessing.get("zeroed_leads") or {}
  print(f"{manifest.num_records} records in {len(manifest.shards)} shards, "
        f"{len(manifest.failures)} failed, {manifest.num_labels} labels -> {args.out}"
        + (f"; {len(zeroed)} with missing leads entered as zeros (manifest.json "
           "preprocessing.zeroed_leads)" if zeroed else ""))
  return 0
