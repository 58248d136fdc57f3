"""The `hubert-ecg-jax` console command: one entry point, one module per subcommand.

Each module in `hubert_ecg_jax.commands` exposes `register(subparsers)`, which adds its
subparser and sets `func` to the function that runs it (called with the parsed namespace).
Command modules import heavy dependencies (JAX, TensorFlow, torch) inside the function that
runs them, so that `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module under hubert_ecg_jax.commands, one-line help)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("convert", "convert", "import PyTorch HuBERT-ECG weights as an Orbax model directory"),
    ("export", "export", "export a model to a Hugging Face directory"),
    ("features", "features", "dump per-frame features of every record for k-means targets"),
    ("targets", "targets", "write k-means units into the records as pre-training targets"),
    ("bench", "bench", "benchmark forward pass or train step against PyTorch"),
    ("preprocess", "preprocess", "prepare ECG records into sharded TFRecord files (resumable)"),
    ("cluster", "cluster", "fit k-means pre-training targets on feature arrays, with a K sweep"),
    ("pretrain", "pretrain", "pre-train HuBERT-ECG by masked prediction (data-parallel, resumable)"),
    ("labels-template", "labels_template", "write the labels CSV template for a folder of ECG records"),
    ("finetune", "finetune", "fine-tune or linear-probe on labelled ECGs, with early stopping and a test report"),
    ("evaluate", "evaluate", "metrics, bootstrap intervals and plots of a fine-tuned model on a test set"),
    ("predict", "predict", "label probabilities (and ECG plots) for ECG files with a fine-tuned model"),
    ("embed", "embed", "deterministic embeddings (mean-pooled or per frame, any layer) to .npy"),
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="hubert-ecg-jax",
      description="HuBERT-ECG in JAX/Flax: convert weights, prepare ECG data, pre-train, "
      "fine-tune, evaluate, predict and embed.")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, module_name, _ in COMMANDS:
    module = importlib.import_module(f"hubert_ecg_jax.commands.{module_name}")
    module.register(subparsers)
    assert name in subparsers.choices, f"{module_name}.register did not add {name!r}"
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  try:
    result = args.func(args)
  except (ValueError, OSError) as error:  # bad input, missing files, full disk: a message, not a traceback
    print(f"hubert-ecg-jax {args.command}: error: {error}", file=sys.stderr)
    return 1
  return int(result or 0)


if __name__ == "__main__":
  sys.exit(main())
