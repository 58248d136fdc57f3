"""Linear probe: a frozen backbone, embeddings computed once, a scikit-learn linear head.

More in docs/modules.md."""
from __future__ import annotations

import math
import pathlib
import warnings
from typing import Callable

import numpy as np

from hubert_ecg_jax.finetune.config import FinetuneSettings
from hubert_ecg_jax.finetune.run import (BEST_MODEL, FinetuneResult, Prepared, Validation,
                                         save_classifier, validate)
from hubert_ecg_jax.inference import classifier_logits_fn, embedding_fn, run_on_records_dir
from hubert_ecg_jax.parallel import BatchRunner

STD_FLOOR = 1e-6


def train_embeddings(runner: BatchRunner, settings: FinetuneSettings, prepared: Prepared
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings (N, hidden) of the first 5 s, targets) of the training split."""
  result = run_on_records_dir(runner, prepared.params["hubert_ecg"], prepared.splits["train"],
                              "first", 1, progress=settings.train.progress)
  return result.outputs[:, 0], prepared.task.targets(result.labels, result.label_names)


def fit_head(kind: str, features: np.ndarray, targets: np.ndarray, c_value: float, balanced: bool,
             max_iter: int, num_outputs: int) -> tuple[np.ndarray, np.ndarray]:
  """A linear head on standardised features: kernel (hidden, outputs), bias (outputs,)."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression, Ridge

  class_weight = "balanced" if balanced else None
  hidden = features.shape[1]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    if kind == "regression":
      ridge = Ridge(alpha=1.0 / c_value).fit(features, targets)
      return ridge.coef_.reshape(num_outputs, hidden).T, np.atleast_1d(ridge.intercept_)
    if kind == "multi_class":
      model = LogisticRegression(C=c_value, max_iter=max_iter, class_weight=class_weight)
      model.fit(features, targets)
      kernel = np.zeros((hidden, num_outputs))
      bias = np.full(num_outputs, -1e4)  # classes absent from training are never predicted
      if len(model.classes_) == 2:  # sklearn keeps one logit z for the second class: (0, z)
        kernel[:, model.classes_[1]], bias[model.classes_[1]] = model.coef_[0], model.intercept_[0]
        bias[model.classes_[0]] = 0.0
      else:
        kernel[:, model.classes_], bias[model.classes_] = model.coef_.T, model.intercept_
      return kernel, bias
    kernel, bias = np.zeros((hidden, num_outputs)), np.zeros(num_outputs)
    for label in range(num_outputs):
      column = targets[:, label]
      if column.min() == column.max():  # one class in training: a constant logit
        rate = np.clip(column.mean(), 1e-4, 1 - 1e-4)
        bias[label] = math.log(rate / (1 - rate))
        continue
      model = LogisticRegression(C=c_value, max_iter=max_iter, class_weight=class_weight)
      model.fit(features, column)
      kernel[:, label], bias[label] = model.coef_[0], model.intercept_[0]
    return kernel, bias


def fold_standardisation(kernel: np.ndarray, bias: np.ndarray, mean: np.ndarray, std: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
  """A head on (x - mean) / std as a head on x: kernel / std, bias - mean . (kernel / std)."""
  folded = kernel / std[:, None]
  return folded.astype(np.float32), (bias - mean @ folded).astype(np.float32)


def linear_probe(settings: FinetuneSettings, prepared: Prepared, workdir: pathlib.Path,
                 print_fn: Callable[[str], None]) -> FinetuneResult:
  """Fits the probe (see the module docstring) and saves the best as `workdir/best_model`."""
  embed_runner = BatchRunner(embedding_fn(prepared.config), settings.eval.batch_size)
  train_x, train_y = train_embeddings(embed_runner, settings, prepared)
  mean = train_x.mean(axis=0)
  std = np.maximum(train_x.std(axis=0), STD_FLOOR)
  standardised = (train_x - mean) / std
  runner = BatchRunner(classifier_logits_fn(prepared.model), settings.eval.batch_size)
  best: tuple[float, float, dict, Validation] | None = None
  for c_value in settings.probe_c_values:
    kernel, bias = fit_head(prepared.task.kind, standardised, train_y, c_value,
                            settings.train.use_loss_weights, settings.probe_max_iter,
                            prepared.task.num_outputs)
    folded_kernel, folded_bias = fold_standardisation(kernel, bias, mean, std)
    params = dict(prepared.params, classifier={"kernel": folded_kernel, "bias": folded_bias})
    validation = validate(runner, params, prepared, settings)
    print_fn(f"linear probe C={c_value:g}: validation score {validation.score:.4f}, "
             f"loss {validation.loss:.4f}")
    if best is None or validation.score > best[0] or (math.isnan(best[0]) and not math.isnan(validation.score)):
      best = (validation.score, c_value, params, validation)
  score, c_value, params, validation = best
  notes = prepared.notes + [f"linear probe: C={c_value:g} of {list(settings.probe_c_values)}, "
                            f"features standardised on {len(train_x)} training records"]
  save_classifier(workdir / BEST_MODEL, prepared, settings, params, validation, 0, notes)
  print_fn(f"saved the linear probe (C={c_value:g}) to {workdir / BEST_MODEL}")
  return FinetuneResult("finished", 0, 0, float(score), workdir / BEST_MODEL, prepared.splits)
