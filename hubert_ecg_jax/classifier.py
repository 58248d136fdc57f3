"""HuBERT-ECG with a classification head, as the original fine-tunes it.

Masked mean pooling of `last_hidden_state` over non-padding frames, dropout, then a linear layer
(what the paper used) or a small MLP (Linear -> tanh -> Linear). Params:
{"hubert_ecg": backbone (no pretraining heads), "classifier": ..., ["classifier_hidden": ...]}.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.layers import Linear
from hubert_ecg_jax.model import HubertECG

Array = jax.Array


def masked_mean(hidden: Array, frame_mask: Array | None) -> Array:
  """(batch, frames, hidden), (batch, frames) bool -> (batch, hidden) mean over kept frames."""
  if frame_mask is None:
    return jnp.mean(hidden, axis=1)
  weights = frame_mask.astype(hidden.dtype)[:, :, None]
  return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class HubertECGForClassification(nn.Module):
  config: HubertECGConfig
  num_labels: int
  classifier_hidden_size: int | None = None
  classifier_dropout: float = 0.1

  def setup(self):
    self.hubert_ecg = HubertECG(self.config, pretraining_heads=False)
    self.dropout = nn.Dropout(self.classifier_dropout)
    if self.classifier_hidden_size:
      self.classifier_hidden = Linear(self.classifier_hidden_size)
    self.classifier = Linear(self.num_labels)

  def __call__(self, x: Array, attention_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    """x: (batch, samples) -> logits (batch, num_labels)."""
    out = self.hubert_ecg(x, attention_mask=attention_mask, deterministic=deterministic)
    pooled = masked_mean(out.last_hidden_state, out.frame_mask)  # (batch, hidden)
    pooled = self.dropout(pooled, deterministic=deterministic)
    if self.classifier_hidden_size:
      pooled = jnp.tanh(self.classifier_hidden(pooled))
    return self.classifier(pooled)
