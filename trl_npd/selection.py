"""The selection stage: Δ-IFD drops the samples that sit far outside the near-policy band.

IFD_m(x, y) = L_m(y | x) / L_m(y), with L_m model m's mean token NLL of completion y with and without the prompt
(Li et al. 2023). Δ = IFD_teacher - IFD_student, both on the student's own sample. A sample is kept when
`low <= Δ <= high`:
- Δ < low: a degenerate sample; the teacher finds the prompt less useful for it than the student does;
- Δ > high: a "cognitive disconnect"; the student is confident in text the teacher finds unlikely given the prompt.

The NPD paper describes Δ-IFD only as filtering *extreme* out-of-distribution samples; its band is not public. The
bands here:
- `"tails"` (the default): drop only the outliers of the running window of recent Δ, those more than `tail_width`
  robust standard deviations (1.4826 × the median absolute deviation) from its median, and never more than
  `max_drop_frac` of them: the band is widened to the window's outer quantiles when it would cut deeper. When
  teacher and student agree, Δ sits near 0 with both signs, and this band does not cut by sign;
- `"absolute"`: `delta_min <= Δ <= delta_max`, a fixed band for models whose Δ scale is known;
- `"quantile"`: keep Δ between two quantiles of the running window (always drops that share).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

# Unconditional NLLs below this are treated as this: a model certain of y without the prompt would otherwise
# divide by zero.
MIN_UNCONDITIONAL_NLL = 1e-6
# The tails band drops nothing until the window holds this many Δ: a median and a MAD of fewer say little.
MIN_TAILS_WINDOW = 64
# MAD x this estimates the standard deviation of normally distributed values.
MAD_TO_STD = 1.4826
BANDS = ("tails", "absolute", "quantile")


def ifd(conditional_nll: float, unconditional_nll: float) -> float:
    """L(y | x) / L(y), with the denominator floored at MIN_UNCONDITIONAL_NLL."""
    return conditional_nll / max(unconditional_nll, MIN_UNCONDITIONAL_NLL)


def delta_ifd(
    teacher_conditional: float, teacher_unconditional: float, student_conditional: float, student_unconditional: float
) -> float:
    """Δ-IFD of one sample from the four mean NLLs."""
    return ifd(teacher_conditional, teacher_unconditional) - ifd(student_conditional, student_unconditional)


@dataclass
class SelectionResult:
    kept: list[int]  # indices into the scored batch
    dropped: dict[str, int] = field(default_factory=dict)  # "ifd_low", "ifd_high"
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index into the scored batch, reason)
    warnings: list[str] = field(default_factory=list)


# A Δ-IFD setting's config field is its name here with this prefix (`delta_min` is `ifd_delta_min`).
CONFIG_PREFIX = "ifd_"


@dataclass(frozen=True)
class DeltaIFDSettings:
    """The Δ-IFD filter's settings, under one name from the config to the filter: each field is the config field
    `ifd_<field>` (see `NearPolicyDistillConfig`).

    Args:
        band: "tails" (outliers of the running window), "absolute" (`delta_min`/`delta_max` are Δ values) or
            "quantile" (`quantiles` of the running window).
        delta_min, delta_max: the absolute band.
        quantiles: (lo, hi) in [0, 1] for the quantile band.
        window: how many recent Δ values the tails and quantile bands are computed over.
        max_rejected_in_a_row: after this many consecutive rejections, warn with the band and the observed Δ
            distribution and switch to the quantile band (documented policy), so training never starves silently.
        tail_width: the tails band keeps Δ within this many robust standard deviations of the window's median.
        max_drop_frac: the tails band never drops more than this share of the window: it widens to the window's
            `max_drop_frac / 2` and `1 - max_drop_frac / 2` quantiles when those lie outside it.
    """

    band: str = "tails"
    delta_min: float = 0.0
    delta_max: float = 0.8
    quantiles: tuple[float, float] = (0.1, 0.9)
    window: int = 1024
    max_rejected_in_a_row: int = 256
    tail_width: float = 3.5
    max_drop_frac: float = 0.05

    @classmethod
    def from_config(cls, args: Any) -> DeltaIFDSettings | None:
        """The settings in `args`' `ifd_*` fields, or None when `args.ifd_filter` is off."""
        if not args.ifd_filter:
            return None
        values = {f.name: getattr(args, CONFIG_PREFIX + f.name) for f in fields(cls)}
        values["quantiles"] = tuple(values["quantiles"])  # a list when parsed from the command line
        return cls(**values)


class DeltaIFDFilter:
    """Keeps samples whose Δ lies in the band; counts the rest by side; guards against starving the trainer.

    `settings.band` is the band it starts with: a starving absolute band switches to the quantile band (`band`).
    """

    def __init__(self, settings: DeltaIFDSettings | None = None) -> None:
        settings = DeltaIFDSettings() if settings is None else settings
        if settings.band not in BANDS:
            raise ValueError(f"ifd_band must be one of {BANDS}, got {settings.band!r}.")
        self.settings = settings
        self.band = settings.band
        self.recent: deque[float] = deque(maxlen=settings.window)
        self.rejected_in_a_row = 0

    def current_band(self) -> tuple[float, float]:
        settings = self.settings
        if self.band == "absolute":
            return settings.delta_min, settings.delta_max
        values = sorted(self.recent)
        if self.band == "quantile":
            return _quantile(values, settings.quantiles[0]), _quantile(values, settings.quantiles[1])
        if len(values) < MIN_TAILS_WINDOW:
            return -math.inf, math.inf
        median = _quantile(values, 0.5)
        spread = settings.tail_width * MAD_TO_STD * _quantile(sorted(abs(v - median) for v in values), 0.5)
        half = settings.max_drop_frac / 2
        return (
            min(median - spread, _quantile(values, half)),
            max(median + spread, _quantile(values, 1.0 - half)),
        )

    def select(self, deltas: list[float]) -> SelectionResult:
        """Decide on a batch of Δ values (NaN: undefined, kept). The window is updated first, so a quantile band
        is defined from the very first batch."""
        self.recent.extend(d for d in deltas if not math.isnan(d))
        low, high = self.current_band()
        result = SelectionResult(kept=[])
        for i, delta in enumerate(deltas):
            if math.isnan(delta) or low <= delta <= high:
                result.kept.append(i)
                self.rejected_in_a_row = 0
                continue
            side = "ifd_low" if delta < low else "ifd_high"
            result.dropped[side] = result.dropped.get(side, 0) + 1
            result.rejected.append((i, side))
            self.rejected_in_a_row += 1
            if self.rejected_in_a_row >= self.settings.max_rejected_in_a_row and self.band == "absolute":
                result.warnings.append(self._starvation_warning())
                self.band = "quantile"
                self.rejected_in_a_row = 0
        return result

    def _starvation_warning(self) -> str:
        values = sorted(self.recent)
        stats = ", ".join(f"p{int(q * 100)}={_quantile(values, q):.3f}" for q in (0.0, 0.1, 0.5, 0.9, 1.0))
        low, high = self.settings.delta_min, self.settings.delta_max
        lo, hi = self.settings.quantiles
        return (
            f"Δ-IFD rejected {self.rejected_in_a_row} samples in a row: none of them fell in the band "
            f"[{low}, {high}]. Observed Δ over the last {len(values)} samples: {stats}. Switching to the "
            f"quantile band [{lo}, {hi}] of recent Δ so training does not starve; set ifd_band='quantile' (or a band "
            "that fits these models) to choose this up front."
        )


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    position = q * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)
