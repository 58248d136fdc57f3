"""A model on a subset of the 12 leads: the other leads' part of the model input set to zero.

The model input (6000,) is the 12 leads' 5-s windows flattened lead-major and decimated by 5, so
lead l owns samples l*500 ... l*500+499 (`attributions` maps them the same way). `keep_leads` zeros
the blocks of the leads not kept, after decimation: what `evaluate --leads` measures is the model
with those leads absent, the way `missing_leads="zero"` enters leads a record lacks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, canonical_lead_name

SAMPLES_PER_LEAD = 500  # a lead's block of the (6000,) model input


def parse_leads(leads: str | Sequence[str]) -> tuple[str, ...]:
  """'I,II,V1' or ['i', 'ii', 'v1'] -> ('I', 'II', 'V1') in standard order; unknown names refused."""
  names = [name for name in (leads.split(",") if isinstance(leads, str) else leads) if name.strip()]
  canonical = [canonical_lead_name(name) for name in names]
  unknown = [name for name, lead in zip(names, canonical) if lead is None]
  if unknown or not names:
    raise ValueError(f"expected lead names among {list(STANDARD_LEADS)}, found {names or 'none'}"
                     + (f" (unknown: {unknown})" if unknown else ""))
  return tuple(lead for lead in STANDARD_LEADS if lead in canonical)


def input_lead_mask(leads: Sequence[str]) -> np.ndarray:
  """(6000,) float32: 1 on the model-input blocks of `leads`, 0 on the others."""
  kept = parse_leads(leads)
  return np.repeat([lead in kept for lead in STANDARD_LEADS], SAMPLES_PER_LEAD).astype(np.float32)


def keep_leads(fn: Callable, leads: Sequence[str]) -> Callable:
  """fn(params, x, mask) run with the blocks of the leads not in `leads` zeroed in x (batch, 6000)."""
  keep = input_lead_mask(leads)

  def run(params: Any, x: Any, mask: Any) -> Any:
    return fn(params, x * keep, mask)

  return run
