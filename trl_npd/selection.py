"""The selection stage: Δ-IFD keeps the samples that sit in the near-policy band.

IFD_m(x, y) = L_m(y | x) / L_m(y), with L_m model m's mean token NLL of completion y with and without the prompt
(Li et al. 2023). Δ = IFD_teacher - IFD_student, both on the student's own sample. A sample is kept when
`low <= Δ <= high`:
- Δ < low: a degenerate sample; the teacher finds the prompt less useful for it than the student does;
- Δ > high: a "cognitive disconnect"; the student is confident in text the teacher finds unlikely given the prompt.

The band is absolute (`ifd_band="absolute"`, the paper's [0, 0.8]) or a quantile band over a running window of
recent Δ (`ifd_band="quantile"`), since the right absolute band depends on the models.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Unconditional NLLs below this are treated as this: a model certain of y without the prompt would otherwise
# divide by zero.
MIN_UNCONDITIONAL_NLL = 1e-6


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
    warnings: list[str] = field(default_factory=list)


class DeltaIFDFilter:
    """Keeps samples whose Δ lies in the band; counts the rest by side; guards against starving the trainer.

    Args:
        band: "absolute" (`low`/`high` are Δ values) or "quantile" (`quantiles` of the running window).
        low, high: the absolute band.
        quantiles: (lo, hi) in [0, 1] for the quantile band.
        window: how many recent Δ values the quantile band is computed over.
        max_rejected_in_a_row: after this many consecutive rejections, warn with the band and the observed Δ
            distribution and switch to the quantile band (documented policy), so training never starves silently.
    """

    def __init__(
        self,
        band: str = "absolute",
        low: float = 0.0,
        high: float = 0.8,
        quantiles: tuple[float, float] = (0.1, 0.9),
        window: int = 1024,
        max_rejected_in_a_row: int = 256,
    ) -> None:
        if band not in ("absolute", "quantile"):
            raise ValueError(f"ifd_band must be 'absolute' or 'quantile', got {band!r}.")
        self.band = band
        self.low, self.high = low, high
        self.quantiles = quantiles
        self.recent: deque[float] = deque(maxlen=window)
        self.max_rejected_in_a_row = max_rejected_in_a_row
        self.rejected_in_a_row = 0

    def current_band(self) -> tuple[float, float]:
        if self.band == "absolute":
            return self.low, self.high
        values = sorted(self.recent)
        return _quantile(values, self.quantiles[0]), _quantile(values, self.quantiles[1])

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
            self.rejected_in_a_row += 1
            if self.rejected_in_a_row >= self.max_rejected_in_a_row and self.band == "absolute":
                result.warnings.append(self._starvation_warning())
                self.band = "quantile"
                self.rejected_in_a_row = 0
        return result

    def _starvation_warning(self) -> str:
        values = sorted(self.recent)
        stats = ", ".join(f"p{int(q * 100)}={_quantile(values, q):.3f}" for q in (0.0, 0.1, 0.5, 0.9, 1.0))
        lo, hi = self.quantiles
        return (
            f"Δ-IFD rejected {self.rejected_in_a_row} samples in a row: none of them fell in the band "
            f"[{self.low}, {self.high}]. Observed Δ over the last {len(values)} samples: {stats}. Switching to the "
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
