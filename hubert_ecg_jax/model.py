"""The HuBERT-ECG encoder in Flax Linen, numerically identical to `transformers.HubertModel`.

More in docs/modules.md."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.layers import (ChannelNorm, LayerNorm, Linear, PositionalConvEmbedding, conv1d,
                                   gelu)

Array = jax.Array
LOGIT_TEMPERATURE = 0.1
COSINE_EPS = 1e-8  # torch.cosine_similarity clamps each norm at this value


@flax.struct.dataclass
class HubertECGOutput:
  last_hidden_state: Array  # (batch, frames, hidden)
  hidden_states: tuple[Array, ...] | None = None  # num_layers + 1 of (batch, frames, hidden)
  frame_mask: Array | None = None  # (batch, frames) bool: True where the frame is not padding


def frame_lengths(config: HubertECGConfig, sample_lengths: Array) -> Array:
  """Frames covered by `sample_lengths` unpadded input samples (transformers' output lengths)."""
  lengths = sample_lengths
  for kernel, stride in zip(config.conv_kernel, config.conv_stride):
    lengths = (lengths - kernel) // stride + 1
  return lengths


def frame_mask_from_attention_mask(config: HubertECGConfig, attention_mask: Array,
                                   num_frames: int) -> Array:
  """(batch, samples) 0/1 input mask -> (batch, frames) bool; right padding, as transformers."""
  lengths = frame_lengths(config, jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
  return jnp.arange(num_frames)[None, :] < lengths[:, None]


class FeatureEncoder(nn.Module):
  """Strided VALID convolutions with GELU; GroupNorm on conv 0 only, or LayerNorm on every conv."""

  config: HubertECGConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: (batch, samples)
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    h = x[:, :, None].astype(jnp.float32)  # (batch, samples, 1)
    for i, (width, kernel, stride) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
      h = ConvLayer(cfg, i, width, kernel, stride, dtype, name=f"conv_layers_{i}")(h)
    return h  # (batch, frames, conv_dim[-1])


class ConvLayer(nn.Module):
  config: HubertECGConfig
  index: int
  features: int
  kernel_size: int
  stride: int
  compute_dtype: Any

  @nn.compact
  def __call__(self, h: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.he_normal(),
                        (self.kernel_size, h.shape[-1], self.features), jnp.float32)
    h = conv1d(h, kernel, self.stride, self.compute_dtype)
    if self.config.conv_bias:
      h = h + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    if self.config.feat_extract_norm == "layer":
      h = LayerNorm(1e-5, name="layer_norm")(h)
    elif self.index == 0:
      h = ChannelNorm(1e-5, name="layer_norm")(h)
    return gelu(h)


class Attention(nn.Module):
  """Multi-head self-attention with biases."""

  config: HubertECGConfig

  @nn.compact
  def __call__(self, h: Array, attention_bias: Array | None, deterministic: bool) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    batch, frames, hidden = h.shape
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    # Three products rather than one on concatenated kernels: concatenating the float32 kernels
    # on every call cost more than the larger product saved (XLA:CPU, base, batch 8).
    q, k, v = (Linear(hidden, compute_dtype=dtype, name=name)(h).reshape(batch, frames, heads, -1)
               for name in ("q_proj", "k_proj", "v_proj"))  # each (batch, frames, heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype),
                        preferred_element_type=jnp.float32) * head_dim**-0.5
    if attention_bias is not None:
      scores = scores + attention_bias  # (batch, 1, 1, frames)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v.astype(dtype),
                         preferred_element_type=jnp.float32).reshape(batch, frames, hidden)
    return Linear(hidden, compute_dtype=dtype, name="out_proj")(context)


class FeedForward(nn.Module):
  config: HubertECGConfig

  @nn.compact
  def __call__(self, h: Array, deterministic: bool) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    h = gelu(Linear(cfg.intermediate_size, compute_dtype=dtype, name="intermediate_dense")(h))
    h = nn.Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
    h = Linear(cfg.hidden_size, compute_dtype=dtype, name="output_dense")(h)
    return nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Post-LN (released models) or pre-LN ("stable") transformer layer."""

  config: HubertECGConfig

  @nn.compact
  def __call__(self, h: Array, attention_bias: Array | None, deterministic: bool) -> Array:
    cfg = self.config
    attention = Attention(cfg, name="attention")
    feed_forward = FeedForward(cfg, name="feed_forward")
    norm = LayerNorm(cfg.layer_norm_eps, name="layer_norm")
    final_norm = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")
    dropout = nn.Dropout(cfg.hidden_dropout)
    if cfg.do_stable_layer_norm:
      h = h + dropout(attention(norm(h), attention_bias, deterministic), deterministic=deterministic)
      return h + feed_forward(final_norm(h), deterministic)
    h = norm(h + dropout(attention(h, attention_bias, deterministic), deterministic=deterministic))
    return final_norm(h + feed_forward(h, deterministic))


class Encoder(nn.Module):
  config: HubertECGConfig

  @nn.compact
  def __call__(self, h: Array, frame_mask: Array | None, deterministic: bool,
               output_hidden_states: bool) -> tuple[Array, tuple[Array, ...] | None]:
    cfg = self.config
    attention_bias = None
    if frame_mask is not None:
      h = jnp.where(frame_mask[:, :, None], h, 0.0)  # padded frames enter as zeros
      attention_bias = jnp.where(frame_mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    positions = PositionalConvEmbedding(cfg.hidden_size, cfg.num_conv_pos_embeddings,
                                        cfg.num_conv_pos_embedding_groups,
                                        jnp.dtype(cfg.compute_dtype), name="pos_conv_embed")(h)
    h = h + positions
    if not cfg.do_stable_layer_norm:
      h = LayerNorm(cfg.layer_norm_eps, name="layer_norm")(h)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    # remat: activations recomputed in the backward pass; `deterministic` (argument 3) is static.
    layer_class = nn.remat(EncoderLayer, static_argnums=(3,)) if cfg.remat else EncoderLayer
    hidden_states = []
    for i in range(cfg.num_hidden_layers):
      hidden_states.append(h)
      layer_out = layer_class(cfg, name=f"layers_{i}")(h, attention_bias, deterministic)
      if not deterministic and cfg.layerdrop > 0.0:
        skip = jax.random.uniform(self.make_rng("dropout")) < cfg.layerdrop  # one draw per layer
        layer_out = jnp.where(skip, h, layer_out)
      h = layer_out
    if cfg.do_stable_layer_norm:
      h = LayerNorm(cfg.layer_norm_eps, name="layer_norm")(h)
    hidden_states.append(h)
    return h, (tuple(hidden_states) if output_hidden_states else None)


class HubertECG(nn.Module):
  """HuBERT-ECG: the encoder and (unless `pretraining_heads=False`) its pretraining heads."""

  config: HubertECGConfig
  pretraining_heads: bool = True

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    self.feature_extractor = FeatureEncoder(cfg)
    self.feature_projection_norm = LayerNorm(cfg.layer_norm_eps) if cfg.feat_proj_layer_norm else None
    self.feature_projection = Linear(cfg.hidden_size, compute_dtype=dtype)
    self.feature_projection_dropout = nn.Dropout(cfg.feat_proj_dropout)
    self.masked_spec_embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0),
                                        (cfg.hidden_size,), jnp.float32)
    self.encoder = Encoder(cfg)
    if self.pretraining_heads:
      self.final_proj = [Linear(cfg.classifier_proj_size, compute_dtype=dtype, name=f"final_proj_{i}")
                         for i in range(cfg.ensemble_length)]
      self.label_embedding = [
          nn.Embed(size, cfg.classifier_proj_size, embedding_init=nn.initializers.normal(1.0),
                   name=f"label_embedding_{i}") for i, size in enumerate(cfg.vocab_sizes)]

  def __call__(self, x: Array, attention_mask: Array | None = None,
               mask_time_indices: Array | None = None, deterministic: bool = True,
               output_hidden_states: bool = False) -> HubertECGOutput:
    """x: (batch, samples) float; attention_mask: (batch, samples) 0/1; mask_time_indices: (batch, frames)."""
    cfg = self.config
    if x.ndim != 2:
      raise ValueError(f"HubertECG expects input of shape (batch, samples), found shape {x.shape}")
    if x.shape[1] < cfg.min_input_length:
      raise ValueError(f"input of {x.shape[1]} samples is too short for the conv feature encoder: "
                       f"at least {cfg.min_input_length} samples are needed (6000 for a 5-s 12-lead ECG)")
    features = self.feature_extractor(x)  # (batch, frames, conv_dim[-1])
    frames = features.shape[1]
    frame_mask = None
    if attention_mask is not None:
      if attention_mask.shape != x.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} does not match input {x.shape}")
      frame_mask = frame_mask_from_attention_mask(cfg, attention_mask, frames)
    if self.feature_projection_norm is not None:
      features = self.feature_projection_norm(features)
    h = self.feature_projection_dropout(self.feature_projection(features), deterministic=deterministic)
    if mask_time_indices is not None:
      if mask_time_indices.shape != (x.shape[0], frames):
        raise ValueError(f"mask_time_indices must have shape {(x.shape[0], frames)}, "
                         f"found {mask_time_indices.shape}")
      h = jnp.where(mask_time_indices[:, :, None], self.masked_spec_embed, h)
    h, hidden_states = self.encoder(h, frame_mask, deterministic, output_hidden_states)
    if self.pretraining_heads and self.is_initializing():
      self.logits(h)  # create the head parameters
    return HubertECGOutput(last_hidden_state=h, hidden_states=hidden_states, frame_mask=frame_mask)

  def logits(self, last_hidden_state: Array) -> tuple[Array, ...]:
    """Cosine similarity / 0.1 between projected frames and each codebook's label embeddings."""
    outputs = []
    for i, embedding in enumerate(self.label_embedding):
      projection = self.final_proj[min(i, len(self.final_proj) - 1)](last_hidden_state)  # (b, t, P)
      projection = _unit(projection)
      table = _unit(embedding.embedding)  # (vocab, P)
      dtype = jnp.dtype(self.config.compute_dtype)
      outputs.append(jnp.einsum("btp,vp->btv", projection.astype(dtype), table.astype(dtype),
                                preferred_element_type=jnp.float32) / LOGIT_TEMPERATURE)
    return tuple(outputs)


def _unit(v: Array) -> Array:
  v = v.astype(jnp.float32)
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), COSINE_EPS)
