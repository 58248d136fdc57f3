"""The subcommands of `hubert-ecg-jax`, one module each, and the arguments several of them share."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from hubert_ecg_jax.config import COMPUTE_DTYPES


def add_compute_dtype_argument(parser: argparse.ArgumentParser) -> None:
  """`--compute-dtype` of the commands that run a model forward (embed, predict, evaluate,
  features)."""
  parser.add_argument(
      "--compute-dtype", choices=COMPUTE_DTYPES, default=None,
      help="dtype of the matrix products (float32 accumulation, float32 parameters); bfloat16 is "
      "faster on CPUs with AVX-512 BF16 and on GPUs/TPUs, its outputs within about 1e-2 relative. "
      "Default: the model's own (float32 unless it was set otherwise)")


def add_missing_leads_argument(parser: argparse.ArgumentParser) -> None:
  """`--missing-leads` of the commands that read ECG records (preprocess, embed, predict, evaluate)."""
  parser.add_argument(
      "--missing-leads", choices=("refuse", "zero"), default="refuse",
      help="records whose lead names lack some of the 12 standard leads: refuse them (default) or "
      "enter the missing leads as zeros of the prepared signal; the outputs list which were missing")


def add_feature_source_arguments(parser: argparse.ArgumentParser) -> None:
  """The frame features of the k-means targets (features, targets): hand-made or hidden states."""
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--feature-set", choices=("stats", "mfcc", "mixed"),
                      help="iteration-1 hand-made features per frame")
  source.add_argument("--model", help="model (our model dir, HF dir or .pt) whose hidden states "
                      "are the features (iteration 2+)")
  parser.add_argument("--layer", type=int, default=None,
                      help="with --model: hidden-state index, 0 = encoder input .. L = last layer "
                      "(default: the middle layer)")


def feature_source(args: argparse.Namespace) -> tuple[Callable[..., Any], dict[str, Any]]:
  """(features function, description) from the options of `add_feature_source_arguments`."""
  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be positive, found {args.batch_size}")
  if args.feature_set:
    if args.layer is not None or args.compute_dtype is not None:
      raise ValueError("--layer and --compute-dtype go with --model, not with --feature-set")
    from hubert_ecg_jax.targets.stream import handmade_features
    return handmade_features(args.feature_set)
  from hubert_ecg_jax.inference import hidden_state_features
  return hidden_state_features(args.model, args.layer, args.compute_dtype, args.batch_size)
