"""The converter: every released file form in, a Hugging Face directory out, clear errors."""
from __future__ import annotations

import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from hubert_ecg_jax import HubertECG, HubertECGConfig, export_hf_directory, load_pretrained
from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.cli import main as cli_main
from hubert_ecg_jax.devtools.torch_reference import ecg_like_batch, make_reference
from hubert_ecg_jax.pretrained import load_pretrained_with_heads, params_from_state_dict

from conftest import TEST_DATA

CONFIG = HubertECGConfig.preset("tiny", vocab_sizes=(20,))


@pytest.fixture(scope="module")
def reference():
  return make_reference(CONFIG, seed=7)


@pytest.fixture(scope="module")
def x():
  return ecg_like_batch(2, seed=7)


def _write_hf_dir(directory: pathlib.Path, config: HubertECGConfig, state_dict, fmt: str,
                  spelling: str) -> pathlib.Path:
  directory.mkdir(parents=True)
  renamed = {}
  for key, value in state_dict.items():
    if spelling == "weight_g":
      key = key.replace("parametrizations.weight.original0", "weight_g").replace(
          "parametrizations.weight.original1", "weight_v")
    renamed[key] = value.contiguous()
  if fmt == "safetensors":
    safetensors.torch.save_file(renamed, str(directory / "model.safetensors"))
  else:
    torch.save(renamed, directory / "pytorch_model.bin")
  released = config.to_hf_dict()
  released.update(architectures=["HuBERTECG"], transformers_version="4.38.1",
                  auto_map={"AutoConfig": "hubert_ecg.HuBERTECGConfig", "AutoModel": "hubert_ecg.HuBERTECG"})
  (directory / "config.json").write_text(json.dumps(released))
  return directory


def _assert_same_outputs(config, params, reference, x):
  torch_hidden, torch_logits = reference.forward_all(x)
  model = HubertECG(config)
  out = model.apply({"params": params}, jnp.asarray(x), output_hidden_states=True)
  for ours, theirs in zip(out.hidden_states, torch_hidden):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
  logits = model.apply({"params": params}, out.last_hidden_state, method=HubertECG.logits)
  np.testing.assert_allclose(np.asarray(logits[0]), torch_logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("spelling", ["parametrizations", "weight_g"])
def test_hf_directory_forms(tmp_path, reference, x, fmt, spelling):
  directory = _write_hf_dir(tmp_path / "hf", CONFIG, reference.state_dict_like_original(), fmt, spelling)
  config, params = load_pretrained(directory)
  assert config == CONFIG
  _assert_same_outputs(config, params, reference, x)


def test_original_pt_checkpoint_with_pickled_config(tmp_path, reference, x, monkeypatch):
  """A training checkpoint as the original's pretrain.py saves it, config object pickled inside."""
  module = types.ModuleType("hubert_ecg")

  class HuBERTECGConfig(transformers.HubertConfig):
    model_type = "hubert_ecg"

    def __init__(self, ensemble_length=1, vocab_sizes=(100,), **kwargs):
      super().__init__(**kwargs)
      self.ensemble_length = ensemble_length
      self.vocab_sizes = list(vocab_sizes)

  HuBERTECGConfig.__module__ = "hubert_ecg"
  HuBERTECGConfig.__qualname__ = "HuBERTECGConfig"
  module.HuBERTECGConfig = HuBERTECGConfig
  monkeypatch.setitem(sys.modules, "hubert_ecg", module)
  fields = {k: v for k, v in CONFIG.to_hf_dict().items() if k != "model_type"}
  pickled_config = HuBERTECGConfig(**fields)
  path = tmp_path / "hubert_ecg_tiny.pt"
  torch.save({"global_step": 80000, "patience_count": 0, "model_config": pickled_config,
              "model_state_dict": reference.state_dict_like_original(),
              "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 5e-5}]},
              "best_val_loss": 1.5, "pretraining_vocab_sizes": [20]}, path)
  monkeypatch.delitem(sys.modules, "hubert_ecg")  # the loader must not need the original's code
  config, params = load_pretrained(path)
  assert config.vocab_sizes == (20,) and config.hidden_size == CONFIG.hidden_size
  _assert_same_outputs(config, params, reference, x)


class Payload:
  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(MARKER["path"]),))


MARKER = {}


def test_pt_with_unexpected_pickled_class_is_refused_without_running_it(tmp_path, reference):
  MARKER["path"] = str(tmp_path / "pwned")
  path = tmp_path / "evil.pt"
  torch.save({"model_state_dict": reference.state_dict_like_original(), "model_config": Payload()}, path)
  with pytest.raises(ValueError, match="refused for safety"):
    load_pretrained(path)
  assert not (tmp_path / "pwned").exists()


def test_finetuned_prefix_and_classifier_head(tmp_path, reference, x):
  """Fine-tuned keys (`hubert_ecg.` prefix + `classifier.*`) give the same logits as PyTorch."""
  head = torch.nn.Linear(CONFIG.hidden_size, 4)
  state = {f"hubert_ecg.{k}": v for k, v in reference.state_dict_like_original().items()
           if not k.startswith(("final_proj", "label_embedding"))}
  state.update({f"classifier.{k}": v for k, v in head.state_dict().items()})
  directory = _write_hf_dir(tmp_path / "ft", CONFIG, state, "safetensors", "parametrizations")
  config, params, heads = load_pretrained_with_heads(directory)
  classifier = HubertECGForClassification(config, num_labels=4)
  logits = classifier.apply({"params": {"hubert_ecg": params, **heads}}, jnp.asarray(x))
  with torch.no_grad():
    pooled = reference.hubert(torch.from_numpy(x)).last_hidden_state.mean(dim=1)
    expected = head(pooled).numpy()
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_export_round_trip_and_transformers_loads_it(tmp_path, reference, x):
  params, _ = params_from_state_dict(CONFIG, reference.state_dict_like_original())
  out_dir = export_hf_directory(CONFIG, params, tmp_path / "exported")
  config, reloaded = load_pretrained(out_dir)
  assert config == CONFIG
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, reloaded)
  hf_model = transformers.HubertModel.from_pretrained(out_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(x), output_hidden_states=True).hidden_states
  ours = HubertECG(config).apply({"params": params}, jnp.asarray(x), output_hidden_states=True)
  for a, b in zip(ours.hidden_states, theirs):
    np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=0)
  exported_keys = set(safetensors.torch.load_file(str(out_dir / "model.safetensors")))
  assert {"final_proj.0.weight", "label_embedding.0.weight"} <= exported_keys


def test_cli_convert_then_export(tmp_path, reference, x):
  src = _write_hf_dir(tmp_path / "hf", CONFIG, reference.state_dict_like_original(), "safetensors",
                      "weight_g")
  assert cli_main(["convert", str(src), str(tmp_path / "ours")]) == 0
  config, params = load_pretrained(tmp_path / "ours")
  _assert_same_outputs(config, params, reference, x)
  assert cli_main(["convert", str(src), str(tmp_path / "ours")]) == 1  # exists: refused
  assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "back"),
                   "--weight-norm", "weight_g"]) == 0
  config, back = load_pretrained(tmp_path / "back")
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, back)


def test_config_json_round_trip_of_the_released_large_config():
  data = json.loads((TEST_DATA / "example-config-large.json").read_text())
  config = HubertECGConfig.from_hf_dict(data)
  assert (config.hidden_size, config.num_hidden_layers, config.vocab_sizes) == (960, 16, (1000,))
  assert config == HubertECGConfig.preset("large")
  assert config.to_hf_dict() == data


def test_errors_name_the_problem(tmp_path, reference):
  state = reference.state_dict_like_original()
  with pytest.raises(ValueError, match="not HuBERT-ECG parameters.*decoder.weight"):
    params_from_state_dict(CONFIG, {**state, "decoder.weight": torch.zeros(3)})
  missing = {k: v for k, v in state.items() if "layers.1.attention.q_proj" not in k}
  with pytest.raises(ValueError, match="missing 2 parameter.*layers_1/attention/q_proj"):
    params_from_state_dict(CONFIG, missing)
  with pytest.raises(ValueError, match=r"shape mismatch at encoder/layers_0/.*expects \(32, 32\)"):
    params_from_state_dict(CONFIG.replace(hidden_size=32), {
        **state, "encoder.layers.0.attention.q_proj.weight": torch.zeros(16, 32)})
  with pytest.raises(ValueError, match="do not match the config"):
    params_from_state_dict(CONFIG.replace(num_hidden_layers=3), state)
  with pytest.raises(ValueError, match="model_type 'bert'"):
    HubertECGConfig.from_hf_dict({"model_type": "bert"})
  with pytest.raises(ValueError, match="cannot tell what"):
    (tmp_path / "weights.onnx").write_bytes(b"\0")
    load_pretrained(tmp_path / "weights.onnx")


def test_input_errors():
  model = HubertECG(CONFIG)
  params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 6000)))["params"]
  with pytest.raises(ValueError, match=r"shape \(batch, samples\)"):
    model.apply({"params": params}, jnp.zeros((6000,)))
  with pytest.raises(ValueError, match="too short.*at least 82 samples"):
    model.apply({"params": params}, jnp.zeros((1, 50)))


def test_bf16_compute_close_to_float32(reference, x):
  config = HubertECGConfig.preset("base")
  model32, model16 = HubertECG(config), HubertECG(config.replace(compute_dtype="bfloat16"))
  params = model32.init({"params": jax.random.key(0)}, jnp.zeros((1, 6000)))["params"]
  a, b = (np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x)).last_hidden_state)
          for model in (model32, model16))
  relative = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert b.dtype == np.float32 and relative <= 2e-2, relative


def test_bf16_gradients_close_to_float32(x):
  """bf16 backward products (layers.matmul's rule, the DFT positional conv) vs float32 autodiff."""
  # 64 conv channels: the bf16 block-product convs run (they need >= 64), as in the released sizes.
  config = HubertECGConfig.preset("tiny", conv_dim=(64,) * 5, hidden_size=64, intermediate_size=128)
  model32, model16 = HubertECG(config), HubertECG(config.replace(compute_dtype="bfloat16"))
  params = model32.init({"params": jax.random.key(0)}, jnp.zeros((1, 6000)))["params"]
  mask = jnp.zeros((x.shape[0], 93), bool).at[:, 10:40].set(True)

  def loss(params, model):
    hidden = model.apply({"params": params}, jnp.asarray(x), mask_time_indices=mask).last_hidden_state
    return jnp.mean(jnp.sin(hidden))

  g32, g16 = (jax.jit(jax.grad(loss), static_argnums=1)(params, model)
              for model in (model32, model16))
  flat32, flat16 = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)]) for g in (g32, g16))
  assert flat16.dtype == np.float32
  relative = np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)
  assert 0 < relative <= 3e-2, relative
