"""hubert-ecg-jax: HuBERT-ECG, the self-supervised 12-lead ECG foundation model, in JAX/Flax."""
from __future__ import annotations

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.model import HubertECG, HubertECGOutput
from hubert_ecg_jax.pretrained import export_hf_directory, load_pretrained

__all__ = ["HubertECGConfig", "HubertECG", "HubertECGOutput", "load_pretrained",
           "export_hf_directory", "preprocess_ecg"]
__version__ = "0.1.0"


def __getattr__(name: str):
  # `preprocess_ecg` pulls in scipy; import it on first use.
  if name == "preprocess_ecg":
    from hubert_ecg_jax.data.preprocess import preprocess_ecg
    return preprocess_ecg
  raise AttributeError(f"module 'hubert_ecg_jax' has no attribute {name!r}")
