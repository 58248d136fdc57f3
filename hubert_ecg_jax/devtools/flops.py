"""Model FLOPs of HuBERT-ECG, counted by hand (2 FLOPs per multiply-add, matrix products only).

Used to report model-FLOPs utilisation (MFU) in the benchmarks. Norms, softmax and activations are
left out, as is usual for MFU. The positional conv is counted as the padded convolution PyTorch
runs, although `layers.same_grouped_conv` computes the same result with fewer. A training step is counted as 3x the forward (forward + two
backward products per matrix product).
"""
from __future__ import annotations

from hubert_ecg_jax.config import HubertECGConfig

# Dense bf16 peak FLOP/s of accelerators we may meet, for MFU (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
}


def forward_flops(config: HubertECGConfig, num_samples: int = 6000, with_logits: bool = True) -> int:
  """FLOPs of one forward pass over one ECG of `num_samples` samples."""
  flops = 0
  length, channels = num_samples, 1
  for width, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
    length = (length - kernel) // stride + 1
    flops += 2 * kernel * channels * width * length
    channels = width
  frames, hidden = length, config.hidden_size
  flops += 2 * channels * hidden * frames  # feature projection
  group_in = hidden // config.num_conv_pos_embedding_groups
  flops += 2 * config.num_conv_pos_embeddings * group_in * hidden * (frames + 1)  # positional conv
  per_layer = (2 * 4 * hidden * hidden * frames  # q, k, v, out projections
               + 2 * 2 * frames * frames * hidden  # scores and context
               + 2 * 2 * hidden * config.intermediate_size * frames)  # feed-forward
  flops += config.num_hidden_layers * per_layer
  if with_logits:
    proj = config.classifier_proj_size
    flops += 2 * hidden * proj * frames * len(config.vocab_sizes)
    flops += sum(2 * proj * vocab * frames for vocab in config.vocab_sizes)
  return flops


def train_step_flops(config: HubertECGConfig, num_samples: int = 6000) -> int:
  return 3 * forward_flops(config, num_samples)


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s for a `jax.Device.device_kind` string, or None if unknown (CPUs)."""
  for name, peak in PEAK_BF16_FLOPS.items():
    if name.lower().replace(" ", "") in device_kind.lower().replace(" ", ""):
      return peak
  return None
