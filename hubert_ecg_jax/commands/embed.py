"""`hubert-ecg-jax embed MODEL DATA --out emb.npy`: deterministic HuBERT-ECG embeddings as .npy.

MODEL is any model: released weights (Hugging Face directory or original .pt), a `convert` output
or a fine-tuned model (its backbone is used). DATA is a records directory (`preprocess` output), or
an ECG file or folder (prepared as for training). No masking, no dropout: the same input always
gives the same embedding.

  --pool mean   (records, hidden): mean over the non-padding frames (the classifier's input)
  --pool none   (records, frames, hidden): every frame (one window per record)
  --layer k     hidden state k: 0 is the encoder input, L (the default) the last block's output

With several windows per record (--crop tta/cover), pooled embeddings are averaged over windows.
Next to OUT, `OUT.index.csv` gives the record of every row (row, record_id, source, and the leads
entered as zeros with --missing-leads zero).
"""
from __future__ import annotations

import argparse
from typing import Any

from hubert_ecg_jax.commands import add_compute_dtype_argument, add_missing_leads_argument


def register(subparsers: Any) -> None:
  p = subparsers.add_parser(
      "embed", help="deterministic embeddings (mean-pooled or per frame, any layer) to .npy",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="model: HF directory, original .pt, `convert` output, fine-tuned "
                 "model, or a Hugging Face Hub id (Edoardo-BS/hubert-ecg-base[@REVISION])")
  p.add_argument("data", help="records directory, or an ECG file or folder")
  p.add_argument("--out", required=True, help="output .npy file (an index CSV is written beside it)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument("--layer", type=int, default=None,
                 help="hidden state to take: 0 (encoder input) to L (last block, the default)")
  p.add_argument("--pool", choices=("mean", "none"), default="mean",
                 help="mean over frames (default) or none (every frame)")
  p.add_argument("--crop", choices=("first", "tta", "cover"), default="first",
                 help="windows per record: the first 5 s (default), N evenly spaced (tta), or enough "
                 "to cover the record (cover, files only)")
  p.add_argument("--crops", type=int, default=2, help="windows per record for tta (default 2)")
  p.add_argument("--fs", type=float, help="sampling rate in Hz of .npy records (they do not store it)")
  p.add_argument("--extensions", default=".hea,.npy", help="record files to look for in a folder")
  p.add_argument("--batch-size", type=int, default=64, help="windows per device pass (default 64)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  add_missing_leads_argument(p)
  add_compute_dtype_argument(p)
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.inference import embed_to_file

  shape, layer, index_path, source = embed_to_file(
      args.model, args.data, args.out, args.layer, args.pool, args.crop, args.crops, args.fs,
      [e.strip() for e in args.extensions.split(",") if e.strip()], args.batch_size, args.overwrite,
      progress=not args.quiet, compute_dtype=args.compute_dtype, missing_leads=args.missing_leads)
  print(f"{shape[0]} embeddings of shape {shape[1:]} (layer {layer}, pool "
        f"{args.pool}) -> {args.out}, index {index_path}"
        + (f"; model {source['repo_id']} at commit {source['commit']}" if "commit" in source else ""))
  return 0
