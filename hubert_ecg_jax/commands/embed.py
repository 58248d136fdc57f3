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
import csv
import os
import pathlib
import sys
import tempfile
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


def _atomic_write(path: pathlib.Path, write: Any) -> None:
  """Calls `write(temporary path)`, then renames the temporary file to `path`."""
  handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
  os.close(handle)
  try:
    write(temporary)
    os.replace(temporary, path)
  except BaseException:
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise


def run(args: argparse.Namespace) -> int:
  import numpy as np

  from hubert_ecg_jax.data.preprocess import missing_standard_leads
  from hubert_ecg_jax.data.records import MANIFEST_NAME
  from hubert_ecg_jax.hub import model_source
  from hubert_ecg_jax.inference import (BatchRunner, embedding_fn, list_input_files, load_backbone,
                                        run_on_files, run_on_records_dir)

  out = pathlib.Path(args.out)
  if out.suffix != ".npy":
    raise ValueError(f"--out must name a .npy file, found {out}")
  index_path = out.with_suffix(".index.csv")
  for path in (out, index_path):
    if path.exists() and not args.overwrite:
      raise FileExistsError(f"{path} already exists: choose another --out or pass --overwrite")
  if args.pool == "none" and args.crop != "first":
    raise ValueError("--pool none keeps every frame of one window: use it with --crop first")
  source = model_source(args.model)
  config, backbone = load_backbone(source["path"], args.compute_dtype)
  runner = BatchRunner(embedding_fn(config, args.layer, args.pool), args.batch_size)
  data = pathlib.Path(args.data)
  if (data / MANIFEST_NAME).is_file():
    if args.crop == "cover":
      raise ValueError("--crop cover is for ECG files; records directories take first or tta")
    result = run_on_records_dir(runner, backbone, data, args.crop, args.crops,
                                progress=not args.quiet)
    embeddings, ids = result.outputs.mean(axis=1), result.record_ids
    sources = [str(data)] * len(ids)
    missing = [[] for _ in ids]  # records directories hold prepared records (see their manifest)
  else:
    files = list_input_files(data, [e.strip() for e in args.extensions.split(",") if e.strip()])

    def on_error(source: str, reason: str) -> None:
      print(f"skipped {source}: {reason}", file=sys.stderr)

    rows, ids, sources, missing = [], [], [], []
    for item in run_on_files(runner, backbone, files, args.crop, args.crops, args.fs,
                             on_error=on_error if len(files) > 1 else None, progress=not args.quiet,
                             missing_leads=args.missing_leads):
      rows.append(item.outputs.mean(axis=0))
      ids.append(item.record_id)
      sources.append(item.source)
      missing.append(missing_standard_leads(item.record.lead_names))
    if not rows:
      raise ValueError(f"no record of {data} could be read")
    embeddings = np.stack(rows)
  embeddings = embeddings.astype(np.float32)
  out.absolute().parent.mkdir(parents=True, exist_ok=True)
  _atomic_write(out, lambda path: np.save(path, embeddings))

  def write_index(path: str) -> None:
    with open(path, "w", newline="") as stream:
      writer = csv.writer(stream)
      writer.writerow(["row", "record_id", "source", "missing_leads"])
      writer.writerows([i, record_id, source, ";".join(leads)]
                       for i, (record_id, source, leads) in enumerate(zip(ids, sources, missing)))

  _atomic_write(index_path, write_index)
  layer = config.num_hidden_layers if args.layer is None else args.layer
  print(f"{embeddings.shape[0]} embeddings of shape {embeddings.shape[1:]} (layer {layer}, pool "
        f"{args.pool}) -> {out}, index {index_path}"
        + (f"; model {source['repo_id']} at commit {source['commit']}" if "commit" in source else ""))
  return 0
