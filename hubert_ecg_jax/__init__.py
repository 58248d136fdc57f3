"""hubert-ecg-jax: HuBERT-ECG, the self-supervised 12-lead ECG foundation model, in JAX/Flax.

Which loader for what:
  load_pretrained(path)  -> (config, backbone params) of any model: released Hugging Face weights,
                            an original .pt, or a model directory of ours (`convert`, `pretrain`);
  load_classifier(path)  -> a fine-tuned `Classifier` (config, params, task, thresholds) as
                            `finetune` saves it, for `HubertECGForClassification`;
  load_model(path)       -> (config, params, metadata) of a model directory, as written.
The names are imported on first use, so that `import hubert_ecg_jax.data...` in worker processes
does not pay for importing JAX and Flax.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "HubertECGConfig": "hubert_ecg_jax.config",
    "HubertECG": "hubert_ecg_jax.model",
    "HubertECGOutput": "hubert_ecg_jax.model",
    "HubertECGForClassification": "hubert_ecg_jax.classifier",
    "Classifier": "hubert_ecg_jax.inference",
    "load_pretrained": "hubert_ecg_jax.pretrained",
    "load_classifier": "hubert_ecg_jax.inference",
    "load_model": "hubert_ecg_jax.model_dir",
    "save_model": "hubert_ecg_jax.model_dir",
    "export_hf_directory": "hubert_ecg_jax.pretrained",
    "preprocess_ecg": "hubert_ecg_jax.data.preprocess",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'hubert_ecg_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
