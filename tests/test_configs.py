"""Config files, overrides with type checks, and the `pretrain` command's handling of them."""
from __future__ import annotations

import json

import pytest
from ml_collections import ConfigDict, config_dict

from hubert_ecg_jax.cli import main
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.experiment import (apply_overrides, load_config, pretraining_config,
                                       split_config_args)

from conftest import TEST_DATA


@pytest.mark.parametrize("size,hidden_k,steps,layerdrop", [
    ("small", 500, 400_000, 0.1), ("base", 500, 800_000, 0.1), ("large", 1000, 400_000, 0.0)])
def test_the_originals_recipe_per_size_and_iteration(size: str, hidden_k: int, steps: int,
                                                     layerdrop: float) -> None:
  first = load_config(f"pretrain_{size}")
  assert first.model.size == size and first.model.vocab_sizes == (100,)
  assert first.train.total_steps == 80_000 and first.data.batch_size == 448
  assert first.data.mask_prob == 0.33 and first.optimizer.learning_rate == 5e-5
  assert (first.optimizer.b1, first.optimizer.b2, first.optimizer.eps) == (0.9, 0.98, 1e-9)
  assert first.optimizer.warmup_fraction == 0.08 and first.train.val_every == 4000
  # AdamW's weight decay 0.01 on every parameter, no gradient clipping, masked frames only.
  assert first.optimizer.weight_decay == 0.01 and first.optimizer.decay_all_params is True
  assert not first.optimizer.grad_clip_norm and first.train.alpha == 1.0
  later = load_config(f"configs/pretrain_{size}.py:2")
  assert later.model.vocab_sizes == (hidden_k,) and later.train.total_steps == steps
  assert later.model.layerdrop == layerdrop


def test_demo_config_is_tiny() -> None:
  config = load_config("demo_pretrain")
  assert config.model.size == "tiny" and config.train.total_steps < 1000


def test_overrides_are_parsed_by_type() -> None:
  config = load_config("pretrain_base", ["data.mask_prob=0.25", "--config.train.total_steps=1000",
                                         "model.vocab_sizes=500,1000", "train.progress=false",
                                         "model.compute_dtype=bfloat16", "optimizer.grad_clip_norm=1"])
  assert config.data.mask_prob == 0.25 and config.train.total_steps == 1000
  assert config.model.vocab_sizes == (500, 1000) and config.train.progress is False
  assert config.model.compute_dtype == "bfloat16" and config.optimizer.grad_clip_norm == 1.0
  assert load_config("pretrain_base").train.total_steps == 80_000  # the file is not changed


def test_placeholders_take_their_declared_type() -> None:
  config = ConfigDict({"clip": config_dict.placeholder(float)})
  assert apply_overrides(config, ["clip=2"]).clip == 2.0
  assert apply_overrides(config, ["clip=none"]).clip is None
  with pytest.raises(ValueError, match="--config.clip expects float, found 'big'"):
    apply_overrides(config, ["clip=big"])


@pytest.mark.parametrize("override,message", [
    ("train.total_step=5", r"unknown config key 'train.total_step': train has \[.*'total_steps'"),
    ("trian.total_steps=5", r"unknown config section 'trian': the config has \['data', 'model'"),
    ("train.total_steps=5.5", r"--config.train.total_steps expects int, found '5.5'"),
    ("train.progress=maybe", r"--config.train.progress expects a bool \(true/false\)"),
    ("model.vocab_sizes=a,b", r"--config.model.vocab_sizes expects a tuple of int"),
    ("train=5", r"'train' is a section, not a value"),
    ("train.total_steps", r"must look like key.sub=value"),
])
def test_bad_overrides_say_what_was_expected(override: str, message: str) -> None:
  with pytest.raises(ValueError, match=message):
    load_config("pretrain_small", [override])


def test_bad_config_files_and_arguments(tmp_path) -> None:
  with pytest.raises(FileNotFoundError, match="no config file 'pretrain_huge'.*pretrain_base"):
    load_config("pretrain_huge")
  with pytest.raises(ValueError, match="iteration, 1 or more: found 'two'"):
    load_config("pretrain_base:two")
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(ValueError, match="must define get_config"):
    load_config(str(empty))
  with pytest.raises(ValueError, match="unknown model size 'huge'"):
    pretraining_config("huge")


def test_split_config_args() -> None:
  overrides, rest = split_config_args(["--config.a=1", "--config.b", "2", "other"])
  assert overrides == ["--config.a=1", "--config.b=2"] and rest == ["other"]
  with pytest.raises(ValueError, match="--config.c needs a value"):
    split_config_args(["--config.c"])


def test_pretrain_command_prints_the_resolved_config(tmp_path, capsys) -> None:
  assert main(["pretrain", "demo_pretrain", str(tmp_path), "--print-config",
               "--config.train.total_steps=7"]) == 0
  assert "total_steps: 7" in capsys.readouterr().out
  assert main(["pretrain", "demo_pretrain", str(tmp_path), "--config.train.nope=1"]) == 1
  assert "unknown config key 'train.nope'" in capsys.readouterr().err
  assert main(["pretrain", "demo_pretrain", str(tmp_path)]) == 1
  assert "--config.data.train_dir=RECORDS" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_presets_equal_the_released_configs(size):
  """Every architecture and regularisation value of the released models (tests/data facts)."""
  facts = json.loads((TEST_DATA / "released_config_facts.json").read_text())
  ours = HubertECGConfig.preset(size).to_hf_dict()
  expected = {**facts["common"], **facts["sizes"][size]}
  assert {key: ours[key] for key in expected} == expected


def test_large_preset_equals_the_large_config_dump():
  released = json.loads((TEST_DATA / "example-config-large.json").read_text())
  ours = HubertECGConfig.preset("large").to_hf_dict()
  compared = [key for key in ours if key in released and key not in ("vocab_sizes", "model_type")]
  assert len(compared) > 30
  assert {key: ours[key] for key in compared} == {key: released[key] for key in compared}
