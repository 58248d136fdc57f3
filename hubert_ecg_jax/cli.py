"""The `hubert-ecg-jax` console command: one entry point, one module per subcommand.

Each module in `hubert_ecg_jax.commands` exposes `register(subparsers)`, which adds its
subparser and sets `func` to the function that runs it (called with the parsed namespace).
Command modules import heavy dependencies (JAX, TensorFlow, torch) inside the function that
runs them, so that `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# (subcommand, module under hubert_ecg_jax.commands)
COMMANDS: tuple[tuple[str, str], ...] = (
    # In the order of the workflow: weights, data, pre-training, fine-tuning, inference, tools.
    ("demo", "demo"),
    ("convert", "convert"),
    ("export", "export"),
    ("preprocess", "preprocess"),
    ("labels-template", "labels_template"),
    ("features", "features"),
    ("cluster", "cluster"),
    ("targets", "targets"),
    ("verify", "verify"),
    ("pretrain", "pretrain"),
    ("finetune", "finetune"),
    ("evaluate", "evaluate"),
    ("predict", "predict"),
    ("embed", "embed"),
    ("bench", "bench"),
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="hubert-ecg-jax",
      description="HuBERT-ECG in JAX/Flax: convert weights, prepare ECG data, pre-train, "
      "fine-tune, evaluate, predict and embed.")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, module_name in COMMANDS:
    module = importlib.import_module(f"hubert_ecg_jax.commands.{module_name}")
    module.register(subparsers)
    assert name in subparsers.choices, f"{module_name}.register did not add {name!r}"
  return parser


def main(argv: list[str] | None = None) -> int:
  # TensorFlow (the data pipeline) logs INFO lines from C++ at import (oneDNN, CPU features).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
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
