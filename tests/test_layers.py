"""The two convolutions written as matrix products, against PyTorch's Conv1d (float64)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.layers import cast_kernels, conv1d, matmul, same_grouped_conv
from hubert_ecg_jax.model import HubertECG


def _torch_same_conv(x, weight, tap_scale, groups):
  """PyTorch's positional conv: Conv1d(padding=width // 2, groups); an even width's extra frame
  dropped."""
  width = weight.shape[-1]
  y = torch.nn.functional.conv1d(x.transpose(1, 2), weight * tap_scale, padding=width // 2,
                                 groups=groups)
  return y[:, :, :x.shape[1]].transpose(1, 2)  # (batch, frames, channels)


def _relative_error(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


def _bf16_rounded(a) -> np.ndarray:
  """float64 copy of `a` rounded to bf16: products of these are exact in float64."""
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


SAME_CONV_SHAPES = [  # (frames, channels, groups, width)
    (93, 64, 16, 128),  # the released models' width and groups, fewer channels
    (20, 12, 3, 5),     # odd width
    (7, 8, 2, 16),      # fewer frames than taps
    (1, 4, 1, 4),       # a single frame
    (30, 6, 6, 1),      # width 1, depthwise
]


@pytest.mark.parametrize("frames, channels, groups, width", SAME_CONV_SHAPES)
def test_same_grouped_conv_equals_torch_conv1d_with_its_gradients(frames, channels, groups, width):
  rng = np.random.default_rng(frames + width)
  x = rng.standard_normal((2, frames, channels))
  weight = rng.standard_normal((channels, channels // groups, width)) * 0.1
  tap_scale = rng.uniform(0.5, 2.0, width)
  x_t, weight_t, scale_t = (torch.tensor(a, requires_grad=True) for a in (x, weight, tap_scale))
  cotangent = rng.standard_normal((2, frames, channels))
  theirs = _torch_same_conv(x_t, weight_t, scale_t, groups)
  theirs.backward(torch.from_numpy(cotangent))

  def ours(x, weight, tap_scale):
    return same_grouped_conv(x, weight, tap_scale, groups, jnp.float32)

  args = [jnp.asarray(a, jnp.float32) for a in (x, weight, tap_scale)]
  y, vjp = jax.vjp(ours, *args)
  assert y.shape == (2, frames, channels) and y.dtype == jnp.float32
  assert _relative_error(y, theirs.detach().numpy()) < 1e-5
  for grad, reference in zip(vjp(jnp.asarray(cotangent, jnp.float32)), (x_t, weight_t, scale_t)):
    assert _relative_error(grad, reference.grad.numpy()) < 1e-5


def test_same_grouped_conv_in_bf16_stays_close():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 93, 64))
  weight = rng.standard_normal((64, 4, 128)) * 0.1
  tap_scale = rng.uniform(0.5, 2.0, 128)
  theirs = _torch_same_conv(*(torch.from_numpy(a) for a in (x, weight, tap_scale)), 16).numpy()
  ours = same_grouped_conv(*(jnp.asarray(a, jnp.float32) for a in (x, weight, tap_scale)), 16,
                           jnp.bfloat16)
  assert ours.dtype == jnp.float32
  assert _relative_error(ours, theirs) < 2e-2


@pytest.mark.parametrize("time, width, stride", [
    (1498, 3, 2),  # the released feature encoder's conv 1
    (373, 2, 2),   # conv 3: an odd sample left over
    (100, 3, 3),   # width == stride
    (50, 5, 2),    # three blocks per frame, the last one in part
    (41, 2, 3),    # width < stride: samples skipped
])
def test_bf16_conv1d_equals_conv_of_bf16_rounded_inputs(time, width, stride):
  """The bf16 path is exact up to float32 sums: compared with bf16-rounded inputs in float64."""
  rng = np.random.default_rng(time)
  x = jnp.asarray(rng.standard_normal((2, time, 64)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((width, 64, 32)) * 0.1, jnp.float32)
  rounded = [_bf16_rounded(a) for a in (x, kernel)]
  theirs = torch.nn.functional.conv1d(
      torch.from_numpy(rounded[0]).transpose(1, 2),
      torch.from_numpy(rounded[1]).permute(2, 1, 0), stride=stride).transpose(1, 2).numpy()
  ours = conv1d(x, kernel, stride, jnp.bfloat16)
  assert ours.shape == theirs.shape and ours.dtype == jnp.float32
  assert _relative_error(ours, theirs) < 1e-5


def test_bf16_matmul_and_its_gradient_are_bf16_products_with_float32_sums():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 64))
  kernel = rng.standard_normal((64, 48)) * 0.1
  cotangent = rng.standard_normal((3, 5, 48))
  y, vjp = jax.vjp(lambda x, k: matmul(x, k, jnp.bfloat16),
                   jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
  dx, dkernel = vjp(jnp.asarray(cotangent, jnp.float32))
  assert y.dtype == dx.dtype == dkernel.dtype == jnp.float32
  x16, kernel16, cotangent16 = (_bf16_rounded(a) for a in (x, kernel, cotangent))
  assert _relative_error(y, x16 @ kernel16) < 1e-6
  assert _relative_error(dx, cotangent16 @ kernel16.T) < 1e-6
  assert _relative_error(dkernel, np.einsum("bti,bto->io", x16, cotangent16)) < 1e-6
  # ... and not float32 products: the unrounded cotangent gives a visibly different gradient.
  assert _relative_error(dx, cotangent @ kernel16.T) > 1e-4


def test_float32_matmul_gradient_is_autodiff():
  rng = np.random.default_rng(1)
  x, kernel = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((4, 32), (32, 8)))
  ours = jax.grad(lambda x, k: jnp.sum(jnp.sin(matmul(x, k, jnp.float32))), argnums=(0, 1))(x, kernel)
  plain = jax.grad(lambda x, k: jnp.sum(jnp.sin(x @ k)), argnums=(0, 1))(x, kernel)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bf16_kernel_copies_give_the_same_outputs_without_casting_each_call():
  config = HubertECGConfig.preset("tiny", conv_dim=(64,) * 5, compute_dtype="bfloat16")
  model = HubertECG(config, pretraining_heads=False)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 6000)).astype(np.float32))
  params = model.init({"params": jax.random.key(0)}, x)["params"]
  cast = cast_kernels(params, jnp.bfloat16)
  kinds = {jax.tree_util.keystr(path): leaf.dtype
           for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
  assert all((dtype == jnp.bfloat16) == name.endswith("['kernel']") for name, dtype in kinds.items())
  assert sum(name.endswith("['kernel']") for name in kinds) == 5 + 1 + 2 * 6  # convs, projection, layers
  forward = jax.jit(lambda p, v: model.apply({"params": p}, v).last_hidden_state)
  np.testing.assert_array_equal(forward(cast, x), forward(params, x))
  converts = lambda p: forward.lower(p, x).compile().as_text().count(" convert(")  # noqa: E731
  assert converts(cast) <= converts(params) - 12  # no per-call cast of the 12 encoder kernels
