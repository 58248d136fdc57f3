"""The FLOP counts behind every GFLOP/s and MFU figure, against PyTorch's own counter.

`torch.utils.flop_counter.FlopCounterMode` counts the matrix products and convolutions of
transformers' HubertModel as it runs (2 FLOPs per multiply-add). Forward: equal to ours, exactly.
Training step (forward + backward, layerdrop off): equal to our 3x forward once two known
differences are accounted for: torch computes the cosine logits elementwise (not counted), and its
counter charges a grouped convolution's weight gradient as if it had one group (the positional
conv's 16 groups: 15 extra forward-convolutions' worth).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.devtools.flops import forward_flops, train_step_flops
from hubert_ecg_jax.devtools.torch_reference import TorchHubertECG, ecg_like_batch

CONFIGS = {"tiny": HubertECGConfig.preset("tiny", layerdrop=0.0),
           "tiny_x10": HubertECGConfig.preset("tiny", downsampling="x10", layerdrop=0.0),
           "base": HubertECGConfig.preset("base", layerdrop=0.0)}


def _counted(config: HubertECGConfig, train: bool) -> int:
  torch.manual_seed(0)
  model = TorchHubertECG(config).train(train)
  x = torch.from_numpy(ecg_like_batch(1))
  frames = config.num_frames(6000)
  masked = torch.zeros(1, frames, dtype=torch.bool)
  masked[0, ::3] = True
  targets = torch.randint(0, config.vocab_sizes[0], (1, frames))
  with FlopCounterMode(display=False) as counter:
    if train:
      out = model.hubert(x, mask_time_indices=masked)
      logits = model.logits(out.last_hidden_state)[0]
      F.cross_entropy(logits[masked], targets[masked]).backward()
    else:
      with torch.no_grad():
        model.hubert(x)
  return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_flops_equal_torch_counter(name):
  config = CONFIGS[name]
  assert forward_flops(config, with_logits=False) == _counted(config, train=False)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_step_flops_against_torch_counter(name):
  config = CONFIGS[name]
  frames, hidden = config.num_frames(6000), config.hidden_size
  cosine_logits = sum(2 * config.classifier_proj_size * vocab * frames for vocab in config.vocab_sizes)
  positional_conv = (2 * config.num_conv_pos_embeddings * (hidden // config.num_conv_pos_embedding_groups)
                     * hidden * (frames + 1))
  counter_extra = (config.num_conv_pos_embedding_groups - 1) * positional_conv
  assert train_step_flops(config) - 3 * cosine_logits + counter_extra == _counted(config, train=True)


def test_base_counts_quoted_in_the_readme():
  base = HubertECGConfig.preset("base")
  assert round(forward_flops(base, with_logits=False) / 1e9, 1) == 19.1
  assert round(train_step_flops(base) / 1e9, 1) == 57.6
