"""Pre-training HuBERT-ECG SMALL with the original's recipe (batch 448, AdamW 5e-5, 8% warmup).

  hubert-ecg-jax pretrain pretrain_small WORKDIR --config.data.train_dir=RECORDS
  hubert-ecg-jax pretrain pretrain_small:2 WORKDIR --config.model.init_from=IT1/model ...

The argument is the iteration: 1 (default) learns K=100 units of hand-made features for 80k steps;
2 and later learn units of the previous model's hidden states (K=500, 400k steps). Targets are made
beforehand (`features`, `cluster`, `targets`): the feature set (stats, mfcc, mixed) and the
hidden-state layer are chosen there. Ablations: --config.data.mask_prob, --config.model.vocab_sizes,
--config.model.size, --config.model.downsampling, --config.model.compute_dtype.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from hubert_ecg_jax.experiment import pretraining_config


def get_config(iteration: str | None = None) -> ConfigDict:
  return pretraining_config("small", iteration)
