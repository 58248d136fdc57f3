"""The benchmark command runs and reports the fields the README and issues quote (not a timing test)."""
from __future__ import annotations

import json

import pytest

from hubert_ecg_jax.cli import main as cli_main
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.devtools.flops import forward_flops, peak_flops


@pytest.mark.parametrize("what", ["forward", "train"])
def test_bench_json(capsys, what):
  assert cli_main(["bench", what, "--size", "tiny", "--batch", "2", "--repeats", "1", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  for key in ("jax_fp32_ecg_per_s", "jax_bf16_ecg_per_s", "torch_fp32_ecg_per_s",
              "jax_fp32_vs_torch", "jax_bf16_vs_torch"):
    assert result[key] > 0


def test_flop_count_of_base_matches_the_design_figure():
  # DESIGN.md: "A forward needs about 19 GFLOP per ECG" (base, 6000 samples).
  assert 18.5e9 < forward_flops(HubertECGConfig.preset("base")) < 19.5e9
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("cpu") is None
