"""Building blocks of the encoder: mixed-precision products and the weight-normed positional conv.

Matrix products run in `compute_dtype` with float32 accumulation and float32 output
(`preferred_element_type`): on CPUs with native bf16 (AVX-512 BF16) and on GPUs/TPUs this is the
fast path, while a bf16 x bf16 -> bf16 product is not. Parameters are float32; for inference in bf16,
`cast_kernels` stores the kernels in bf16 once.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, as PyTorch's `nn.GELU()`; computed in float32."""
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False)


def matmul(x: Array, kernel: Array, compute_dtype: jnp.dtype) -> Array:
  """`x @ kernel` over the last axis of x, in `compute_dtype` with float32 accumulation and output.

  In bf16 the two products of its gradient run in bf16 as well (the float32 cotangent cast down,
  float32 accumulation, as mixed-precision training does); autodiff alone would run them in float32
  because the cotangent is float32 (2x slower on CPU, and on GPUs more).
  """
  x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
  if jnp.dtype(compute_dtype) == jnp.float32:
    return _last_axis_product(x, kernel)
  return _low_precision_matmul(x, kernel, jnp.dtype(compute_dtype))


def _last_axis_product(x: Array, kernel: Array) -> Array:
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x: Array, kernel: Array, compute_dtype: jnp.dtype) -> Array:
  return _last_axis_product(x.astype(compute_dtype), kernel.astype(compute_dtype))


def _low_precision_matmul_fwd(x, kernel, compute_dtype):
  x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
  return _last_axis_product(x, kernel), (x, kernel)  # residuals kept in compute_dtype


def _low_precision_matmul_bwd(compute_dtype, residuals, dy):
  x, kernel = residuals  # x: (..., in); kernel: (in, out); dy: (..., out) float32
  dy = dy.astype(compute_dtype)
  dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())),
                       preferred_element_type=jnp.float32)  # (..., in)
  leading = tuple(range(x.ndim - 1))
  dkernel = lax.dot_general(x, dy, ((leading, leading), ((), ())),
                            preferred_element_type=jnp.float32)  # (in, out)
  return dx, dkernel


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def cast_kernels(params: Any, compute_dtype: jnp.dtype) -> Any:
  """`params` with every matrix-product and conv kernel (the "kernel" leaves) stored in
  `compute_dtype`, the rest (norms, biases, the positional conv's weight norm) kept float32.

  For inference in bf16: `matmul` and `conv1d` then find their kernels already cast instead of
  casting the float32 weights on every call. The results are the same, bit for bit.
  """
  def cast(path: tuple, leaf: Array) -> Array:
    return leaf.astype(compute_dtype) if getattr(path[-1], "key", None) == "kernel" else leaf

  return jax.tree_util.tree_map_with_path(cast, params)


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


def conv1d(x: Array, kernel: Array, stride: int, compute_dtype: jnp.dtype) -> Array:
  """VALID 1-D convolution. x: (batch, time, in); kernel: (width, in, out) -> float32 (b, frames, out).

  float32 keeps XLA's convolution (oneDNN on CPU: the fastest float32 path). In bf16 a conv over
  many channels runs as matrix products instead, because XLA:CPU has a native bf16 product but no
  native bf16 convolution: time is folded into blocks of `stride` samples, (batch, blocks,
  stride * in), so that output frame t reads blocks t .. t + ceil(width / stride) - 1 (the last
  one in part), one product per block offset and no im2col copy (base feature encoder, batch 8:
  61 vs 117 ms).
  """
  width, channels, features = kernel.shape
  if compute_dtype != jnp.bfloat16 or channels < 64:
    return lax.conv_general_dilated(
        x.astype(compute_dtype), kernel.astype(compute_dtype), window_strides=(stride,),
        padding="VALID", dimension_numbers=("NWC", "WIO", "NWC"),
        preferred_element_type=jnp.float32)
  batch, time = x.shape[:2]
  frames = (time - width) // stride + 1
  offsets = -(-width // stride)  # blocks each output frame reads
  blocks = frames - 1 + offsets
  x = x.astype(compute_dtype)[:, :blocks * stride]
  # Zeros appended here land only in the unread tail of the last block.
  x = jnp.pad(x, ((0, 0), (0, blocks * stride - x.shape[1]), (0, 0)))
  x = x.reshape(batch, blocks, stride * channels)
  kernel = kernel.reshape(width * channels, features)  # rows (tap, in), as a block's columns
  y = None
  for offset in range(offsets):
    taps = min(stride, width - offset * stride)
    rows = kernel[offset * stride * channels:(offset * stride + taps) * channels]
    term = matmul(x[:, offset:offset + frames, :taps * channels], rows, compute_dtype)
    y = term if y is None else y + term
  return y  # (batch, frames, features)


@functools.lru_cache(maxsize=None)
def _dft_tables(frames: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Real DFT tables of `same_grouped_conv` for `frames` inputs and a kernel of `width` taps.

  The circular correlation of length n = frames + max(pad, width - 1 - pad), pad = width // 2, wraps
  no tap onto a real frame, so on frames 0 .. frames - 1 it equals the zero-padded linear one. With
  F = n // 2 + 1 frequencies: to_freq_x (2F, frames) gives [Re; Im] of x's spectrum, to_freq_kernel
  (2F, width) [Re; Im] of the kernel's conjugate spectrum, from_freq (frames, 2F) the inverse of a
  real signal's half spectrum, read at the output frames.
  """
  pad = width // 2
  n = frames + max(pad, width - 1 - pad)
  freqs = np.arange(n // 2 + 1)[:, None]  # (F, 1)
  x_angle = 2 * np.pi * freqs * np.arange(frames)[None, :] / n
  kernel_angle = 2 * np.pi * freqs * np.arange(width)[None, :] / n
  to_freq_x = np.concatenate([np.cos(x_angle), -np.sin(x_angle)])
  to_freq_kernel = np.concatenate([np.cos(kernel_angle), np.sin(kernel_angle)])
  weight = np.full(freqs.shape[0], 2.0 / n)  # each frequency stands for itself and its mirror
  weight[0] = 1.0 / n
  if n % 2 == 0:
    weight[-1] = 1.0 / n  # Nyquist
  out_angle = 2 * np.pi * (np.arange(frames)[:, None] - pad) * freqs.T / n  # (frames, F)
  from_freq = np.concatenate([weight * np.cos(out_angle), -weight * np.sin(out_angle)], axis=1)
  return tuple(t.astype(np.float32) for t in (to_freq_x, to_freq_kernel, from_freq))


def same_grouped_conv(x: Array, weight: Array, tap_scale: Array, groups: int,
                      compute_dtype: jnp.dtype) -> Array:
  """Grouped 'same' conv over time, computed through exact real DFTs (matrix products).

  x: (batch, frames, channels); weight: (channels, channels // groups, width), PyTorch's Conv1d
  layout, each tap k scaled by tap_scale[k] (weight norm). Returns float32 (batch, frames, channels),
  y[b, t, o] = sum_{k, i} x[b, t + k - width // 2, i] * weight[o, i, k] * tap_scale[k] over the
  inputs i of o's group, x zero outside its frames; PyTorch's `Conv1d(padding=width // 2,
  groups=groups)` with an even width's extra last frame dropped.

  Why not a convolution: at the positional conv's shape (93 frames, width 128, 16 groups) this
  needs ~2 GFLOP per batch of 8 instead of 7, all of it matrix products (bf16 runs at the CPU's
  bf16 product rate; XLA:CPU has no fast bf16 or grouped convolution) and so is its gradient
  (XLA:CPU's kernel gradient of the grouped conv ran ~24x slower than its forward). The transforms
  run in `compute_dtype`; the per-frequency channel mixing (many small products) in float32.
  float32 is within 1e-6 relative of the direct convolution (tests/test_layers.py).
  """
  batch, frames, channels = x.shape
  _, in_per_group, width = weight.shape
  out_per_group = channels // groups
  to_freq_x, to_freq_kernel, from_freq = _dft_tables(frames, width)
  num_freqs = to_freq_x.shape[0] // 2
  mixed = lambda eq, a, b: jnp.einsum(eq, a.astype(compute_dtype), b.astype(compute_dtype),
                                      preferred_element_type=jnp.float32)
  x = x.reshape(batch, frames, groups, in_per_group)
  spectrum = mixed("ft,btgi->fgib", to_freq_x, x).reshape(2, num_freqs, groups, in_per_group, batch)
  weight = weight.reshape(groups, out_per_group, in_per_group, width)
  kernel_spectrum = mixed("fk,goik->fgoi", to_freq_kernel * tap_scale, weight)
  kernel_spectrum = kernel_spectrum.reshape(2, num_freqs, groups, out_per_group, in_per_group)
  (x_re, x_im), (k_re, k_im) = spectrum, kernel_spectrum
  mix = lambda a, b: jnp.einsum("fgoi,fgib->fgob", a, b)  # float32, per (frequency, group)
  out_spectrum = jnp.concatenate([mix(k_re, x_re) - mix(k_im, x_im),   # real part
                                  mix(k_re, x_im) + mix(k_im, x_re)])  # (2F, groups, out, batch)
  y = mixed("tf,fgob->btgo", from_freq, out_spectrum)
  return y.reshape(batch, frames, channels)


class PositionalConvEmbedding(nn.Module):
  """Weight-normed grouped conv over time (kernel 128, 16 groups), same length out, GELU.

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
    tap_scale = (weight_g / _norm_over_taps(weight_v)).reshape(self.width)  # weight norm per tap
    return gelu(same_grouped_conv(x, weight_v, tap_scale, self.groups, self.compute_dtype) + bias)


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
