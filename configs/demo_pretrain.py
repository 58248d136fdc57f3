"""A tiny pre-training run (hidden 32, 2 layers) that finishes in minutes on a laptop CPU.

  hubert-ecg-jax pretrain demo_pretrain WORKDIR --config.data.train_dir=RECORDS

Same recipe as the real configs, scaled down: batch 16, 300 steps, a higher learning rate.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from hubert_ecg_jax.experiment import pretraining_config


def get_config() -> ConfigDict:
  config = pretraining_config("tiny", 1)
  config.model.dropout = 0.0
  config.data.batch_size = 16
  config.data.shuffle_buffer = 64
  config.optimizer.learning_rate = 1e-3
  config.optimizer.grad_clip_norm = 1.0
  config.train.total_steps = 300
  config.train.log_every = 25
  config.train.val_every = 100
  config.train.checkpoint_every = 100
  return config
