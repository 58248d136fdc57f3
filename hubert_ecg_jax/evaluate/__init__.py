"""Evaluation library: metrics, bootstrap intervals and reports (numpy, scikit-learn; no JAX)."""
from __future__ import annotations

from hubert_ecg_jax.evaluate.bootstrap import (
    ConfidenceInterval,
    LabelBootstrap,
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_label_ci,
)
from hubert_ecg_jax.evaluate.metrics import (
    FmaxResult,
    MulticlassMetrics,
    MultilabelMetrics,
    RegressionMetrics,
    ThresholdTuning,
    fmax_score,
    label_auprc,
    label_auroc,
    multiclass_metrics,
    multilabel_metrics,
    regression_metrics,
    tune_thresholds,
)
from hubert_ecg_jax.evaluate.report import (
    MultilabelEvaluation,
    aggregate_crops,
    evaluate_multilabel,
    format_table,
    write_csv,
    write_json,
)

__all__ = [
    "ConfidenceInterval", "FmaxResult", "LabelBootstrap", "MulticlassMetrics",
    "MultilabelEvaluation", "MultilabelMetrics", "RegressionMetrics", "ThresholdTuning",
    "aggregate_crops", "bootstrap_ci", "bootstrap_indices", "bootstrap_label_ci",
    "evaluate_multilabel", "fmax_score", "format_table", "label_auprc", "label_auroc",
    "multiclass_metrics", "multilabel_metrics", "regression_metrics", "tune_thresholds",
    "write_csv", "write_json",
]
