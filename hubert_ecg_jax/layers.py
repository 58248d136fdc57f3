"""Building blocks of the encoder: mixed-precision products and the weight-normed positional conv.

Matrix products run in `compute_dtype` with float32 accumulation and float32 output
(`preferred_element_type`): on CPUs with native bf16 (AVX-512 BF16) and on GPUs/TPUs this is the
fast path, while a bf16 x bf16 -> bf16 product is not. Parameters are always float32.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, as PyTorch's `nn.GELU()`; computed in float32."""
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False)


def matmul(x: Array, kernel: Array, compute_dtype: jnp.dtype) -> Array:
  """`x @ kernel` over the last axis of x, in `compute_dtype` with float32 accumulation."""
  return lax.dot_general(
      x.astype(compute_dtype), kernel.astype(compute_dtype),
      (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


class LinearWeights(nn.Module):
  """The float32 parameters of a dense layer: kernel (in, out) and bias (out,)."""

  in_features: int
  features: int

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    kernel = self.param("kernel", nn.initializers.normal(0.02), (self.in_features, self.features),
                        jnp.float32)
    return kernel, self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


class Linear(nn.Module):
  """A dense layer whose kernel is stored (in, out) in float32 and multiplied in `compute_dtype`."""

  features: int
  compute_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return matmul(x, kernel, self.compute_dtype) + bias


def conv1d(x: Array, kernel: Array, stride: int, groups: int, compute_dtype: jnp.dtype) -> Array:
  """VALID 1-D convolution. x: (batch, time, in); kernel: (width, in // groups, out).

  In bf16, an ungrouped conv over many channels runs as strided slices + one matrix product
  (XLA:CPU has a native bf16 product but not a native bf16 convolution: 81 vs 101 ms for the
  base feature encoder's convs 1-4, batch 8); float32 keeps XLA's convolution, which is faster.
  """
  if compute_dtype == jnp.bfloat16 and groups == 1 and x.shape[-1] >= 64:
    width = kernel.shape[0]
    frames = (x.shape[1] - width) // stride + 1
    columns = jnp.concatenate(
        [x[:, tap: tap + stride * (frames - 1) + 1: stride] for tap in range(width)], axis=-1)
    return matmul(columns, kernel.reshape(-1, kernel.shape[-1]), compute_dtype)
  return lax.conv_general_dilated(
      x.astype(compute_dtype), kernel.astype(compute_dtype), window_strides=(stride,),
      padding="VALID", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
      preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def grouped_conv1d(x: Array, kernel: Array, groups: int, compute_dtype: jnp.dtype) -> Array:
  """Stride-1 VALID grouped conv whose kernel gradient is itself a forward grouped convolution.

  XLA:CPU computes the kernel gradient of a wide grouped convolution (the positional conv: width
  128, 16 groups) far slower than the forward pass; the backward rule below expresses that
  gradient as an ordinary grouped convolution, which runs at forward speed. Same values as
  autodiff (checked in tests/test_layers.py).
  """
  return conv1d(x, kernel, 1, groups, compute_dtype)


def _grouped_conv1d_fwd(x, kernel, groups, compute_dtype):
  return conv1d(x, kernel, 1, groups, compute_dtype), (x, kernel)


def _grouped_conv1d_bwd(groups, compute_dtype, residuals, dy):
  x, kernel = residuals  # x: (batch, time_in, channels); kernel: (width, channels // groups, out)
  width, in_per_group, out_channels = kernel.shape
  batch, time_in, channels = x.shape
  # Input gradient: autodiff's transposed convolution is fast on every backend.
  _, x_vjp = jax.vjp(lambda x_: conv1d(x_, kernel, 1, groups, compute_dtype), x)
  (dx,) = x_vjp(dy.astype(jnp.float32))
  # Kernel gradient: dk[w, i, g*O + o] = sum_{b,t} x[b, t + w, g*I + i] * dy[b, t, g*O + o].
  # As a grouped conv: batch <- i (in-channel within group), space <- time, features <- (g, b);
  # the "kernel" is dy with space <- t, in-features <- b, out-features <- (g, o).
  lhs = x.reshape(batch, time_in, groups, in_per_group).transpose(3, 1, 2, 0)
  lhs = lhs.reshape(in_per_group, time_in, groups * batch)  # (I, time_in, groups*batch)
  rhs = dy.transpose(1, 0, 2)  # (time_out, batch, out): per group, `batch` inputs -> O outputs
  dk = lax.conv_general_dilated(
      lhs.astype(compute_dtype), rhs.astype(compute_dtype), window_strides=(1,), padding="VALID",
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
      preferred_element_type=jnp.float32)  # (I, width, out)
  dk = dk.transpose(1, 0, 2)
  assert dk.shape == (width, in_per_group, out_channels), (dk.shape, kernel.shape)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


grouped_conv1d.defvjp(_grouped_conv1d_fwd, _grouped_conv1d_bwd)


class PositionalConvEmbedding(nn.Module):
  """Weight-normed grouped conv over time (kernel 128, 16 groups), last frame dropped, GELU.

  Parameters keep PyTorch's layout and weight-norm split: `weight_v` (out, in // groups, width),
  `weight_g` (1, 1, width) (weight norm over dim 2: one norm per kernel tap), `bias` (out,).
  """

  hidden_size: int
  width: int
  groups: int
  compute_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: (batch, frames, hidden)
    in_per_group = self.hidden_size // self.groups
    weight_v = self.param("weight_v", nn.initializers.normal(0.02),
                          (self.hidden_size, in_per_group, self.width), jnp.float32)
    weight_g = self.param("weight_g", lambda key, shape, dtype: _norm_over_taps(weight_v),
                          (1, 1, self.width), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.hidden_size,), jnp.float32)
    weight = weight_g * weight_v / _norm_over_taps(weight_v)  # (out, in // groups, width)
    kernel = weight.transpose(2, 1, 0)  # (width, in // groups, out)
    pad = self.width // 2
    x_padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    y = grouped_conv1d(x_padded, kernel, self.groups, self.compute_dtype) + bias
    if self.width % 2 == 0:  # an even kernel gives one frame too many: drop the last
      y = y[:, :-1]
    return gelu(y)


def _norm_over_taps(weight_v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(0, 1), keepdims=True))


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """LayerNorm over the last axis in float32 with biased variance, as PyTorch."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + eps) * scale + bias


class LayerNorm(nn.Module):
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return layer_norm(x, scale, bias, self.eps)


class ChannelNorm(nn.Module):
  """PyTorch `GroupNorm(num_groups=C, num_channels=C)`: each channel normalised over time."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: (batch, time, channels)
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + self.eps) * scale + bias
