"""The PyTorch original for parity checks and benchmarks (needs the `torch` extra).

`transformers.HubertModel` plus HuBERT-ECG's heads, written from the published facts (reference
§1): `final_proj.{i}` Linear(H, P), `label_embedding.{i}` Embedding(V_i, P), logits =
cosine_similarity(projection, embedding) / 0.1. `make_reference` randomises every parameter, norms
and weight-norm magnitudes included, so that no parameter sits at its default.
"""
from __future__ import annotations

import os

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow (seconds, logs)

import numpy as np
import torch
import transformers

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.convert import flax_to_state_dict


class TorchHubertECG(torch.nn.Module):
  def __init__(self, config: HubertECGConfig, attn_implementation: str = "eager"):
    super().__init__()
    hf = transformers.HubertConfig(**config.to_hf_dict())
    hf._attn_implementation = attn_implementation
    self.hubert = transformers.HubertModel(hf)
    self.final_proj = torch.nn.ModuleList(
        [torch.nn.Linear(config.hidden_size, config.classifier_proj_size)
         for _ in range(config.ensemble_length)])
    self.label_embedding = torch.nn.ModuleList(
        [torch.nn.Embedding(v, config.classifier_proj_size) for v in config.vocab_sizes])

  def state_dict_like_original(self) -> dict[str, torch.Tensor]:
    """Keys as the original's HuBERTECG (a HubertModel subclass): no `hubert.` prefix."""
    out = {}
    for key, value in self.state_dict().items():
      out[key[len("hubert."):] if key.startswith("hubert.") else key] = value
    return out

  def load_flax_params(self, params: dict) -> None:
    """Copies a HubertECG params tree (with or without pretraining heads) into this model."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_state_dict(params).items()}
    heads = {k: v for k, v in state.items() if k.startswith(("final_proj", "label_embedding"))}
    self.hubert.load_state_dict({k: v for k, v in state.items() if k not in heads})
    if heads:
      self.load_state_dict(heads, strict=False)

  def logits(self, last_hidden_state: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for i, embedding in enumerate(self.label_embedding):
      projection = self.final_proj[min(i, len(self.final_proj) - 1)](last_hidden_state)
      out.append(torch.cosine_similarity(projection.unsqueeze(2), embedding.weight[None, None],
                                         dim=-1) / 0.1)
    return out

  @torch.no_grad()
  def forward_all(self, x: np.ndarray, attention_mask: np.ndarray | None = None):
    self.eval()
    device = next(self.parameters()).device
    mask = None if attention_mask is None else torch.from_numpy(attention_mask).long().to(device)
    out = self.hubert(torch.from_numpy(x).to(device), attention_mask=mask, output_hidden_states=True)
    logits = self.logits(out.last_hidden_state)
    # The last entry is the encoder's output, after the pre-LN encoder's final LayerNorm, as in
    # transformers 4.x and in ours. transformers 5 records the pre-LN encoder's last hidden state
    # before that LayerNorm (its last_hidden_state is unchanged); the post-LN encoder has none.
    hidden = [*out.hidden_states[:-1], out.last_hidden_state]
    return [h.cpu().numpy() for h in hidden], [l.cpu().numpy() for l in logits]


def randomise_(module: torch.nn.Module, seed: int) -> None:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if "norm" in name and name.endswith("weight"):
        param.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        param.copy_(0.1 * noise)
      elif name.endswith(("original0", "weight_g")):
        param.copy_(0.5 + noise.abs())
      elif "masked_spec_embed" in name or "label_embedding" in name:
        param.copy_(noise)
      else:
        fan_in = int(np.prod(param.shape[1:])) if param.ndim > 1 else param.shape[0]
        param.copy_(noise / np.sqrt(fan_in))


def make_reference(config: HubertECGConfig, seed: int = 0) -> TorchHubertECG:
  torch.manual_seed(seed)
  model = TorchHubertECG(config)
  randomise_(model, seed)
  return model.eval()


def ecg_like_batch(batch: int, length: int = 6000, seed: int = 0) -> np.ndarray:
  """Smooth random signals in [-1, 1], like min-max scaled ECGs."""
  rng = np.random.default_rng(seed)
  raw = np.cumsum(rng.normal(size=(batch, length)), axis=1)
  raw -= raw.min(axis=1, keepdims=True)
  return (2 * raw / raw.max(axis=1, keepdims=True) - 1).astype(np.float32)
