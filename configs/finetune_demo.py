"""A tiny fine-tuning run (hidden 32, 2 layers, from random weights) that finishes in minutes on a CPU.

  hubert-ecg-jax finetune finetune_demo runs/demo \
      --config.data.train=RECORDS_TRAIN --config.data.val=RECORDS_VAL --config.data.test=RECORDS_TEST

RECORDS_* are records directories written by `hubert-ecg-jax preprocess` (one per split). Same recipe
as the real configs, scaled down: batch 16, 300 steps, validation every 50, a higher learning rate,
every layer trainable (from scratch there is nothing to keep frozen).
"""
from __future__ import annotations

from ml_collections import ConfigDict

from hubert_ecg_jax.finetune.config import default_config


def get_config() -> ConfigDict:
  config = default_config()
  config.model.init = "scratch"
  config.model.size = "tiny"
  config.model.attention_dropout = 0.0
  config.model.classifier_dropout = 0.0
  config.train.freeze_feature_encoder = False
  config.train.batch_size = 16
  config.train.steps = 300
  config.train.learning_rate = 1e-3
  config.train.grad_clip_norm = 1.0
  config.train.eval_every = 50
  config.train.patience = 4
  config.train.log_every = 25
  config.train.shuffle_buffer = 256
  config.eval.batch_size = 32
  config.eval.n_boot = 200
  return config
