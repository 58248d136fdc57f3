"""Pre-training targets: iteration-1 frame features and k-means in JAX."""
from __future__ import annotations

from hubert_ecg_jax.targets.features import (FEATURE_SETS, STAT_NAMES, MfccConfig, feature_dim,
                                             frame_features, frame_mfcc, frame_statistics,
                                             num_frames)

__all__ = [
    "FEATURE_SETS", "STAT_NAMES", "MfccConfig", "feature_dim", "frame_features", "frame_mfcc",
    "frame_statistics", "num_frames",
]
