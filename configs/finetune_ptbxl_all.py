"""Fine-tune on PTB-XL all (every SCP statement, 71 labels), the original's recipe.

  hubert-ecg-jax finetune finetune_ptbxl_all:small runs/ptbxl_all_small \
      --config.model.pretrained=PATH/hubert-ecg-small --config.data.manual_dir=PATH/ptb-xl-1.0.3

The recipe, the size argument and other data sources: see
`hubert_ecg_jax.finetune.config.ptbxl_config`.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from hubert_ecg_jax.finetune.config import ptbxl_config


def get_config(size: str | None = None) -> ConfigDict:
  return ptbxl_config("all", size)
