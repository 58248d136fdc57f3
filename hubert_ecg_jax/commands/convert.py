"""`hubert-ecg-jax convert SRC DST`: released PyTorch weights -> a hubert-ecg-jax model directory."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "convert", help="import PyTorch HuBERT-ECG weights (HF dir or .pt) as an Orbax model directory",
      description="Reads a Hugging Face directory as released (config.json + model.safetensors or "
      "pytorch_model.bin, either weight-norm spelling, with or without the 'hubert_ecg.' prefix of "
      "fine-tuned checkpoints) or one of the original's .pt training checkpoints, checks every "
      "parameter against the config, and writes DST: config.json + Orbax params (+ metadata.json).")
  p.add_argument("src", help="Hugging Face model directory, original .pt checkpoint, or a Hub id "
                 "(Edoardo-BS/hubert-ecg-base, ORG/NAME@REVISION; from the Hub cache, HF_HOME)")
  p.add_argument("dst", help="output model directory (must not exist unless --overwrite)")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.hub import model_source
  from hubert_ecg_jax.model_dir import save_model
  from hubert_ecg_jax.pretrained import load_pretrained_with_heads

  source = model_source(args.src)
  config, params, heads = load_pretrained_with_heads(source["path"])
  tree = {"hubert_ecg": params, **heads} if heads else params
  count = sum(v.size for v in _leaves(tree))
  metadata = {"source": str(args.src), "parameters": int(count), "classifier_head": bool(heads),
              "resolved": source}
  save_model(args.dst, config, tree, metadata=metadata, overwrite=args.overwrite)
  print(f"converted {args.src} -> {args.dst}: hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, vocab {list(config.vocab_sizes)}, "
        f"{count / 1e6:.1f}M parameters{' + classifier head' if heads else ''}")
  return 0


def _leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)
