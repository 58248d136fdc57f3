"""Fine-tune on PTB-XL superdiag (diagnostic superclasses, 5 labels), the original's recipe.

  hubert-ecg-jax finetune finetune_ptbxl_superdiag:small runs/ptbxl_superdiag_small \
      --config.model.pretrained=PATH/hubert-ecg-small --config.data.manual_dir=PATH/ptb-xl-1.0.3

The recipe, the size argument and other data sources: see
`hubert_ecg_jax.finetune.config.ptbxl_config`.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from hubert_ecg_jax.finetune.config import ptbxl_config


def get_config(size: str | None = None) -> ConfigDict:
  return ptbxl_config("superdiag", size)
