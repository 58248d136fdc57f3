"""`hubert-ecg-jax finetune CONFIG WORKDIR [--config.KEY=VALUE ...]`: fine-tune (or linear-probe)
HuBERT-ECG on labelled ECGs, keep the best model by validation, and evaluate it on the test split.

CONFIG is a file of configs/ (finetune_demo, finetune_ptbxl_{all,diag,subdiag,superdiag,form,rhythm};
`finetune_ptbxl_all:base` picks the model size's recipe) or any file with get_config(). Data come as
records directories (`preprocess` each split), the original's split CSVs with their records folder,
or a TFDS dataset (PTB-XL); see hubert_ecg_jax/finetune/data.py. WORKDIR receives:

  best_model/        the classifier with the best validation score (for evaluate / predict / embed)
  checkpoints/       training state and data position: rerunning the command resumes
  tensorboard/       train and validation curves
  test_evaluation/   the `evaluate` report of best_model on the test split (when data.test is set)
  data/              prepared splits (split CSV and TFDS sources)

`--config.mode=linear_probe` fits a logistic-regression head on frozen embeddings instead.
SIGTERM or Ctrl-C checkpoints and stops.
"""
from __future__ import annotations

import argparse
import signal
from typing import Any

from hubert_ecg_jax.files import as_path

_FLAGS = {"--print-config": "print_config", "--no-test": "no_test"}


def register(subparsers: Any) -> None:
  p = subparsers.add_parser(
      "finetune", help="fine-tune or linear-probe on labelled ECGs, with early stopping and a test report",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="config file or name (e.g. configs/finetune_ptbxl_superdiag.py, "
                 "finetune_ptbxl_all:base, finetune_demo)")
  p.add_argument("workdir", help="run directory: best_model/, checkpoints/, tensorboard/, test_evaluation/")
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  p.add_argument("--no-test", action="store_true", help="skip the evaluation on the test split")
  p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--config.KEY=VALUE",
                 help="config overrides, after the positional arguments (e.g. "
                 "--config.model.pretrained=hubert-ecg-small --config.data.manual_dir=PTBXL)")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.evaluate.classifier import evaluate_classifier
  from hubert_ecg_jax.experiment import load_config, split_config_args
  from hubert_ecg_jax.finetune.config import settings_from_config
  from hubert_ecg_jax.finetune.loop import finetune

  overrides, rest = split_config_args(args.overrides)
  for flag in rest:  # the flags may also follow the positional arguments
    if flag not in _FLAGS:
      raise ValueError(f"unexpected argument {flag!r}: overrides look like --config.KEY=VALUE")
    setattr(args, _FLAGS[flag], True)
  config = load_config(args.config, overrides)
  if args.print_config:
    print(config)
    return 0
  settings = settings_from_config(config)
  result = finetune(settings, args.workdir)
  if result.stop_reason == "nonfinite":
    return 1
  if result.stop_reason not in ("finished", "early_stopped"):
    return 128 + signal.Signals[result.stop_reason].value
  print(f"best validation score {result.best_score:.4f} at step {result.best_step} -> "
        f"{result.best_model}")
  if "test" in result.splits and not args.no_test:
    e = settings.eval
    summary = evaluate_classifier(result.best_model, result.splits["test"],
                                  as_path(args.workdir) / "test_evaluation", e.crop, e.crops,
                                  e.aggregation, e.n_boot, settings.train.seed, e.batch_size,
                                  overwrite=True, progress=settings.train.progress)
    print(summary["table"])
    print(f"test report -> {as_path(args.workdir) / 'test_evaluation'}")
  return 0
