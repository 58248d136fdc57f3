"""`hubert-ecg-jax export SRC DST`: a model of ours -> a Hugging Face directory (PyTorch)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "export", help="export a model to a Hugging Face directory that transformers loads",
      description="Writes DST/config.json (the original's hubert_ecg format) and "
      "DST/model.safetensors under the original key names, so that "
      "transformers.HubertModel.from_pretrained(DST) loads the backbone; pretraining heads and a "
      "classifier head are kept under the original's names.")
  p.add_argument("src", help="model directory written by convert/pretrain/finetune (or any input "
                 "load_pretrained accepts)")
  p.add_argument("dst", help="output directory")
  p.add_argument("--weight-norm", choices=("parametrizations", "weight_g"),
                 default="parametrizations",
                 help="spelling of the positional conv's weight norm: current PyTorch "
                 "(parametrizations.weight.original0/1, default) or legacy weight_g/weight_v")
  p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.pretrained import export_hf_directory, load_pretrained_with_heads

  config, params, heads = load_pretrained_with_heads(args.src)
  tree = {"hubert_ecg": params, **heads} if heads else params
  export_hf_directory(config, tree, args.dst, weight_norm=args.weight_norm, overwrite=args.overwrite)
  print(f"exported {args.src} -> {args.dst} (config.json + model.safetensors)")
  return 0
