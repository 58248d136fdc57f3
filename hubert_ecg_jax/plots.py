"""PNG figures: ROC curves, per-label AUROC with intervals, a 12-lead ECG on ECG paper (optionally with
attribution heat under the traces) and label-efficiency curves.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no
global backend switch, nothing left open between calls.
"""
from __future__ import annotations

import math
import pathlib
import textwrap
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator
from sklearn.metrics import roc_curve

from hubert_ecg_jax.config import STANDARD_LEADS
from hubert_ecg_jax.evaluate.metrics import (check_multilabel, defined_label_mask, label_auroc,
                                             label_names_or_default)
from hubert_ecg_jax.files import AnyPath, UrlPath, as_path

# The standard 4 x 3 clinical layout: rows of leads; column j shows the j-th quarter of the window.
CLINICAL_LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"
PAPER_SPEED_MM_PER_S = 25.0
GAIN_MM_PER_MV = 10.0
MAX_WINDOW_S = 10.0
_ROW_HEIGHT_MM = 30.0
_PAPER_TOP_MM = 6.0  # headroom above the first row for tall R waves
_CALIBRATION_MM = 10.0  # left margin holding the 1 mV calibration pulse
_HEADER_MM, _FOOTER_MM, _SIDE_MM = 20.0, 8.0, 6.0
_MM_PER_INCH = 25.4
HEAT_SATURATION_PERCENTILE = 99.0


def _save(figure: Figure, path: str | pathlib.Path | UrlPath, dpi: int) -> AnyPath:
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(figure)
  with path.open("wb") as stream:
    figure.savefig(stream, format="png", dpi=dpi)
  return path


def plot_roc_curves(y_true: Any, y_score: Any, path: str | pathlib.Path,
                    label_names: Sequence[str] | None = None, title: str = "ROC curves",
                    max_legend_labels: int = 12, dpi: int = 120) -> pathlib.Path:
  """One figure with a ROC curve per defined label and the macro-average curve, as PNG.

  The macro curve is the mean true-positive rate over the labels on a common false-positive-rate
  grid; its legend entry gives the macro AUROC (mean of the per-label AUROCs). Per-label curves
  are named in the legend when there are at most `max_legend_labels` of them.
  """
  y_true, y_score = check_multilabel(y_true, y_score)
  names = label_names_or_default(label_names, y_true.shape[1])
  defined = np.flatnonzero(defined_label_mask(y_true))
  if len(defined) == 0:
    raise ValueError("expected at least one label with both classes in y_true, found none")
  auroc = label_auroc(y_true, y_score)
  figure = Figure(figsize=(6.4, 6.0))
  axes = figure.add_subplot()
  grid = np.linspace(0.0, 1.0, 201)
  mean_tpr = np.zeros_like(grid)
  named = len(defined) <= max_legend_labels
  palette = colormaps["tab10" if len(defined) <= 10 else "tab20"]
  for index, label in enumerate(defined):
    fpr, tpr, _ = roc_curve(y_true[:, label], y_score[:, label])
    mean_tpr += np.interp(grid, fpr, tpr) / len(defined)
    if named:
      axes.plot(fpr, tpr, lw=1.2, color=palette(index % palette.N),
                label=f"{names[label]} ({auroc[label]:.3f})")
    else:
      axes.plot(fpr, tpr, lw=0.6, alpha=0.35, color="tab:blue",
                label=f"{len(defined)} per-label curves" if index == 0 else None)
  axes.plot(np.r_[0.0, grid], np.r_[0.0, mean_tpr], color="black", lw=2.2,
            label=f"macro (AUROC {np.nanmean(auroc):.3f}, {len(defined)} labels)")
  axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
  axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=title, aspect="equal")
  axes.legend(loc="lower right", fontsize=8 if named else 9, framealpha=0.9)
  n_undefined = y_true.shape[1] - len(defined)
  if n_undefined:
    figure.text(0.01, 0.01, f"{n_undefined} label(s) with one class left out", fontsize=7)
  figure.tight_layout()
  return _save(figure, path, dpi)


def plot_label_auroc(auroc: Any, path: str | pathlib.Path, label_names: Sequence[str] | None = None,
                     ci_lower: Any = None, ci_upper: Any = None, ci_level: float = 0.95,
                     title: str = "AUROC per label", dpi: int = 120) -> pathlib.Path:
  """Horizontal bars of per-label AUROC (L,), best first, with interval whiskers if given.

  Undefined labels (NaN) are left out and counted under the chart; a dashed line marks the macro
  mean (over the defined labels), whose value the title gives.
  """
  auroc = np.asarray(auroc, dtype=np.float64)
  if auroc.ndim != 1 or len(auroc) == 0:
    raise ValueError(f"expected per-label AUROC of shape (labels,), found {auroc.shape}")
  names = label_names_or_default(label_names, len(auroc))
  if (ci_lower is None) != (ci_upper is None):
    raise ValueError("expected both ci_lower and ci_upper, or neither")
  defined = np.flatnonzero(~np.isnan(auroc))
  if len(defined) == 0:
    raise ValueError("expected at least one defined (non-NaN) AUROC, found none")
  order = defined[np.argsort(-auroc[defined], kind="stable")]
  positions = np.arange(len(order))
  figure = Figure(figsize=(7.0, 1.4 + 0.24 * len(order)))
  axes = figure.add_subplot()
  error = None
  if ci_lower is not None:
    bounds = np.stack([np.asarray(ci_lower, dtype=np.float64), np.asarray(ci_upper, dtype=np.float64)])
    if bounds.shape != (2, len(auroc)):
      raise ValueError(f"expected ci_lower and ci_upper of shape ({len(auroc)},), found "
                       f"{np.shape(ci_lower)} and {np.shape(ci_upper)}")
    error = np.nan_to_num(np.abs(bounds[:, order] - auroc[order]))  # undefined interval: no bar
  axes.barh(positions, auroc[order], xerr=error, color="tab:blue", alpha=0.8,
            error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "black"})
  macro = float(auroc[defined].mean())
  axes.axvline(macro, color="tab:red", lw=1.2, ls="--")
  axes.set_yticks(positions, [names[label] for label in order], fontsize=8)
  axes.invert_yaxis()
  low = np.nanmin(auroc[order] - (error[0] if error is not None else 0.0))
  axes.set(xlim=(max(0.0, min(0.5, low) - 0.02), 1.0), ylim=(len(order) - 0.4, -0.6),
           xlabel="AUROC" + (f" (whiskers: {100 * ci_level:g}% interval)" if error is not None
                             else ""),
           title=f"{title} (dashed: macro {macro:.3f}, {len(defined)} labels)")
  axes.grid(axis="x", lw=0.4, alpha=0.6)
  n_undefined = len(auroc) - len(defined)
  if n_undefined:
    figure.text(0.01, 0.005, f"{n_undefined} undefined label(s) left out", fontsize=7)
  figure.tight_layout()
  return _save(figure, path, dpi)


def _lead_indices(lead_names: Sequence[str]) -> dict[str, int]:
  """Standard lead name -> row of the signal, matching names case-insensitively."""
  given = {str(name).lower(): index for index, name in enumerate(lead_names)}
  missing = [lead for lead in STANDARD_LEADS if lead.lower() not in given]
  if missing:
    raise ValueError(f"expected the 12 standard leads {list(STANDARD_LEADS)}, missing {missing} "
                     f"in lead names {list(lead_names)}")
  return {lead: given[lead.lower()] for lead in STANDARD_LEADS}


def _draw_trace(axes, trace: np.ndarray, fs: float, x_start_mm: float, baseline_mm: float) -> None:
  """A trace (mV) from x_start_mm on the row whose zero is baseline_mm, centred on its median."""
  finite = trace[np.isfinite(trace)]
  centre = float(np.median(finite)) if len(finite) else 0.0
  x_mm = x_start_mm + np.arange(len(trace)) / fs * PAPER_SPEED_MM_PER_S
  axes.plot(x_mm, baseline_mm + (trace - centre) * GAIN_MM_PER_MV, color="black", lw=0.6)


def plot_ecg(signal: Any, fs: float, path: str | pathlib.Path,
             lead_names: Sequence[str] = STANDARD_LEADS, title: str | None = None,
             findings: Sequence[tuple[str, float]] | None = None, max_findings: int = 5,
             dpi: int = 150, heat: Any = None, heat_fs: float = 100.0,
             heat_label: str | None = None) -> pathlib.Path:
  """A 12-lead ECG (12, n) in mV at `fs` Hz as PNG, laid out as a clinical printout.

  The standard 4 x 3 layout (I aVR V1 V4 / II aVL V2 V5 / III aVF V3 V6, each column the next
  quarter of the window) plus a rhythm strip of lead II, at 25 mm/s and 10 mm/mV on an ECG-paper
  grid (1 mm and 5 mm squares) drawn to scale, with a 1 mV calibration pulse on each row. The
  window is the whole record up to 10 s (longer records show their first 10 s, as the footer
  says). Each trace is drawn around its own median so baseline offsets do not push it into the
  next row. `findings` (label, probability) pairs are printed at the top, the most probable first.
  `heat` (12, m) >= 0 at `heat_fs` Hz, rows in STANDARD_LEADS order (e.g.
  `attributions.record_heat`), is drawn as a red band under each lead's trace, darker where larger
  (one colour scale over all leads, saturating at its 99th percentile so that a few sharp peaks do
  not hide the rest), and `heat_label` says what it is.
  """
  signal = np.asarray(signal, dtype=np.float64)
  if signal.ndim != 2 or signal.shape[0] != 12 or signal.shape[1] < 8:
    raise ValueError(f"expected a signal of shape (12, samples) with at least 8 samples, "
                     f"found {signal.shape}")
  if not (math.isfinite(fs) and fs > 0):
    raise ValueError(f"expected a positive sampling rate fs, found {fs}")
  if len(lead_names) != 12:
    raise ValueError(f"expected 12 lead names, found {len(lead_names)}")
  leads = _lead_indices(lead_names)
  heat = _checked_heat(heat)
  heat_scale = _heat_scale(heat) if heat is not None else 0.0
  ranked = _ranked_findings(findings, max_findings)
  duration_s = signal.shape[1] / fs
  window = min(signal.shape[1], int(round(MAX_WINDOW_S * fs)))
  column_samples = window // 4
  column_mm = column_samples / fs * PAPER_SPEED_MM_PER_S
  width_mm = 4 * column_mm
  height_mm = 4 * _ROW_HEIGHT_MM + _PAPER_TOP_MM
  figure_width = width_mm + _CALIBRATION_MM + 2 * _SIDE_MM
  figure_height = height_mm + _HEADER_MM + _FOOTER_MM
  figure = Figure(figsize=(figure_width / _MM_PER_INCH, figure_height / _MM_PER_INCH))
  axes = figure.add_axes((_SIDE_MM / figure_width, _FOOTER_MM / figure_height,
                          (width_mm + _CALIBRATION_MM) / figure_width, height_mm / figure_height))
  _draw_paper(axes, -_CALIBRATION_MM, width_mm, height_mm)
  rows = [list(row) for row in CLINICAL_LAYOUT] + [[RHYTHM_LEAD]]
  for row, row_leads in enumerate(rows):
    baseline = height_mm - _PAPER_TOP_MM - (row + 0.55) * _ROW_HEIGHT_MM
    _draw_calibration(axes, baseline)
    for column, lead in enumerate(row_leads):
      if len(row_leads) == 1:  # the rhythm strip: the whole window
        start, stop, x_start = 0, window, 0.0
      else:
        start, stop, x_start = column * column_samples, (column + 1) * column_samples, column * column_mm
      if heat is not None:
        _draw_heat(axes, heat[STANDARD_LEADS.index(lead)], heat_fs, start / fs, stop / fs, x_start,
                   baseline, heat_scale)
      _draw_trace(axes, signal[leads[lead], start:stop], fs, x_start, baseline)
      axes.text(x_start + 1.5, baseline + 0.38 * _ROW_HEIGHT_MM, lead, fontsize=9,
                fontweight="bold", va="center")
      if column > 0:
        axes.plot([x_start, x_start], [baseline - 4, baseline + 4], color="black", lw=0.8)
  header_top = 1 - 4 / figure_height
  figure.text(_SIDE_MM / figure_width, header_top, title or "12-lead ECG", fontsize=12,
              fontweight="bold", va="top")
  if ranked:
    # Two lines when the names are long (about 2.1 mm per character at 10 pt), broken only between
    # findings: no-break spaces inside each one (textwrap breaks at ASCII whitespace only).
    items = [f"{label} {probability:.2f}".replace(" ", "\u00a0") for label, probability in ranked]
    text = "\n".join(textwrap.wrap("Top findings:  " + "   ".join(items),
                                    int((figure_width - 2 * _SIDE_MM) / 2.1), max_lines=2,
                                    break_long_words=False, placeholder=" ..."))
    figure.text(_SIDE_MM / figure_width, header_top - 7 / figure_height, text, fontsize=10, va="top",
                color="darkred")
  if heat_label:
    figure.text(1 - _SIDE_MM / figure_width, header_top, heat_label, fontsize=9, va="top",
                ha="right", color="firebrick")
  shown = window / fs
  footer = (f"{PAPER_SPEED_MM_PER_S:g} mm/s   {GAIN_MM_PER_MV:g} mm/mV   {fs:g} Hz   "
            + (f"first {shown:.1f} s of {duration_s:.1f} s shown" if window < signal.shape[1]
               else f"{shown:.1f} s"))
  figure.text(_SIDE_MM / figure_width, 2.5 / figure_height, footer, fontsize=8, va="bottom")
  return _save(figure, path, dpi)


def _checked_heat(heat: Any) -> np.ndarray | None:
  if heat is None:
    return None
  heat = np.asarray(heat, dtype=np.float64)
  if heat.ndim != 2 or heat.shape[0] != 12 or not np.isfinite(heat).all() or (heat < 0).any():
    raise ValueError(f"expected heat of shape (12, samples) with finite values >= 0, found shape "
                     f"{heat.shape}")
  return heat


def _heat_scale(heat: np.ndarray) -> float:
  """Where the colour saturates: the 99th percentile of the heat, or its maximum if that is 0."""
  scale = float(np.percentile(heat, HEAT_SATURATION_PERCENTILE))
  return scale if scale > 0 else float(heat.max())


def _draw_heat(axes, row: np.ndarray, heat_fs: float, start_s: float, stop_s: float,
               x_start_mm: float, baseline_mm: float, top: float) -> None:
  """The heat of one lead between start_s and stop_s as a band under its trace (transparent at 0)."""
  part = np.minimum(row[int(start_s * heat_fs):int(np.ceil(stop_s * heat_fs))], top)
  if len(part) == 0 or top <= 0:
    return
  width_mm = len(part) / heat_fs * PAPER_SPEED_MM_PER_S
  half = 0.4 * _ROW_HEIGHT_MM
  axes.imshow(part[None, :], extent=(x_start_mm, x_start_mm + width_mm, baseline_mm - half,
                                     baseline_mm + half), aspect="auto", cmap="Reds", vmin=0.0,
              vmax=top, alpha=0.6 * part[None, :] / top, interpolation="nearest", zorder=1)


def plot_label_efficiency(fractions: Any, scores: Any, path: str | pathlib.Path,
                          labels: Sequence[str] | None = None, metric: str = "macro AUROC",
                          title: str = "Label efficiency", dpi: int = 120) -> pathlib.Path:
  """Score against the fraction of training labels (log x axis), one line per series.

  fractions (points,), scores (series, points) or (points,); NaN scores are left out.
  """
  fractions = np.asarray(fractions, dtype=np.float64)
  scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
  if fractions.ndim != 1 or scores.shape[1] != len(fractions) or not (fractions > 0).all():
    raise ValueError(f"expected fractions (points,) > 0 and scores (series, points), found "
                     f"{fractions.shape} and {scores.shape}")
  names = label_names_or_default(labels, len(scores))
  figure = Figure(figsize=(6.0, 4.2))
  axes = figure.add_subplot()
  order = np.argsort(fractions)
  for name, row in zip(names, scores):
    axes.plot(fractions[order], row[order], marker="o", label=name)
  axes.set_xscale("log")
  axes.set_xticks(fractions[order], [f"{100 * f:g}%" for f in fractions[order]])
  axes.set(xlabel="fraction of the training labels", ylabel=metric, title=title)
  axes.grid(lw=0.4, alpha=0.6)
  axes.legend(fontsize=8)
  figure.tight_layout()
  return _save(figure, path, dpi)


def _ranked_findings(findings: Sequence[tuple[str, float]] | None,
                     max_findings: int) -> list[tuple[str, float]]:
  """The `max_findings` most probable (label, probability) pairs, checked to be probabilities."""
  if findings is None:
    return []
  ranked = []
  for label, probability in findings:
    probability = float(probability)
    if not 0.0 <= probability <= 1.0:
      raise ValueError(f"expected finding probabilities in [0, 1], found {probability} for {label!r}")
    ranked.append((str(label), probability))
  return sorted(ranked, key=lambda pair: -pair[1])[:max_findings]


def _draw_paper(axes, x_min_mm: float, width_mm: float, height_mm: float) -> None:
  """ECG paper: pale 1 mm squares, stronger 5 mm squares, axes sized to scale in millimetres."""
  axes.set_xlim(x_min_mm, width_mm)
  axes.set_ylim(0, height_mm)
  axes.set_facecolor("#fff7f5")
  axes.xaxis.set_major_locator(MultipleLocator(5))
  axes.xaxis.set_minor_locator(MultipleLocator(1))
  axes.yaxis.set_major_locator(MultipleLocator(5))
  axes.yaxis.set_minor_locator(MultipleLocator(1))
  axes.grid(which="minor", color="#f7c9c2", lw=0.35)
  axes.grid(which="major", color="#e8877a", lw=0.7)
  axes.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
  axes.set_axisbelow(True)
  for spine in axes.spines.values():
    spine.set_color("#e8877a")


def _draw_calibration(axes, baseline_mm: float) -> None:
  """The 1 mV, 0.2 s calibration pulse in the left margin."""
  pulse_mm = 0.2 * PAPER_SPEED_MM_PER_S
  left = -_CALIBRATION_MM + 2.0
  x = [left, left + 1.5, left + 1.5, left + 1.5 + pulse_mm, left + 1.5 + pulse_mm, left + 3 + pulse_mm]
  y = [baseline_mm, baseline_mm, baseline_mm + GAIN_MM_PER_MV, baseline_mm + GAIN_MM_PER_MV,
       baseline_mm, baseline_mm]
  axes.plot(x, y, color="black", lw=0.8)
