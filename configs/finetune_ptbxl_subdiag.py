"""Fine-tune HuBERT-ECG on PTB-XL subdiag (diagnostic subclasses, 23 labels) with the original's recipe.

  hubert-ecg-jax finetune configs/finetune_ptbxl_subdiag.py:small runs/ptbxl_subdiag_small \
      --config.model.pretrained=PATH/hubert-ecg-small --config.data.manual_dir=PATH/ptb-xl-1.0.3

(`:base` / `:large` with those weights; the size sets finetune.sh's layerdrop: 0.0 small, 0.1 base
and large.) Folds 1-8 train, 9 validation, 10 test, from the PTB-XL folder via the TFDS builder.
Recipe (finetune.sh): AdamW lr 1e-5, betas (0.9, 0.98), eps 1e-9, weight decay 0.01, 8% warmup then
linear decay, batch 64, 70k steps, validation every 500 steps, early stopping after 8 validations
without a better macro AUROC, BCE with pos_weight from the training set, random aligned 5-s crops,
CNN frozen, every transformer block trainable, dropout 0 except attention 0.1 and classifier 0.1.
The original's split CSVs work too: --config.data.source=split_csv --config.data.train=TRAIN.csv
--config.data.val=VAL.csv --config.data.test=TEST.csv --config.data.records_dir=NPY_FOLDER
--config.data.label_start_index=4. Random init (the paper's baseline): --config.model.init=scratch.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from hubert_ecg_jax.finetune.config import ptbxl_config


def get_config(size: str | None = None) -> ConfigDict:
  return ptbxl_config("subdiag", size)
