"""The subcommands of `hubert-ecg-jax`, one module each, and the arguments several of them share."""
from __future__ import annotations

import argparse

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
