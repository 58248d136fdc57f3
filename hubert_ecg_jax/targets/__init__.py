"""Pre-training targets: iteration-1 frame features and k-means in JAX."""
from __future__ import annotations

from hubert_ecg_jax.targets.features import (FEATURE_SETS, STAT_NAMES, MfccConfig, feature_dim,
                                             frame_features, frame_mfcc, frame_statistics,
                                             num_frames)
from hubert_ecg_jax.targets.kmeans import (KMeansConfig, KMeansModel, VectorSource, array_source,
                                           fit_kmeans, format_sweep_table, npy_source, plot_elbow,
                                           sweep_k)

__all__ = [
    "FEATURE_SETS", "STAT_NAMES", "MfccConfig", "feature_dim", "frame_features", "frame_mfcc",
    "frame_statistics", "num_frames", "KMeansConfig", "KMeansModel", "VectorSource", "array_source",
    "fit_kmeans", "format_sweep_table", "npy_source", "plot_elbow", "sweep_k",
]
