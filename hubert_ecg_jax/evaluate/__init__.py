"""Evaluation library: metrics, bootstrap intervals and reports (numpy, scikit-learn; no JAX), and
the report of a fine-tuned classifier (`evaluate.classifier`, which runs the model)."""
from __future__ import annotations

from hubert_ecg_jax.evaluate.bootstrap import (ConfidenceInterval, LabelBootstrap, bootstrap_ci,
                                               bootstrap_indices, bootstrap_label_ci)
from hubert_ecg_jax.evaluate.metrics import (FmaxResult, MulticlassMetrics, MultilabelMetrics,
                                             RegressionMetrics, ThresholdTuning, fmax_score,
                                             label_auprc, label_auroc, multiclass_metrics,
                                             multilabel_metrics, regression_metrics, tune_thresholds)
from hubert_ecg_jax.evaluate.report import (MultilabelEvaluation, aggregate_crops,
                                            evaluate_multilabel, format_table, write_csv, write_json)
