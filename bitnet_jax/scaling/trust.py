"""Can a fitted law be used? The checks a careful reader makes before quoting one.

A law is only a result when it is determined by its data and predicts what it did not see. Each
law of a results table (`fit.fit_table`) gets these checks, in `bitnet fit`, the sweep report and
fits.json:

- `bounds`: no parameter left at a bound of its fit (E at 0 or at the lowest loss, an exponent at
  0 or at its cap): there the data did not place it, and its interval means nothing;
- `resamples`: every bootstrap resample could be fitted (failures leave the intervals biased);
- `exponents`: each exponent's 95% interval is narrower than +-`EXPONENT_SPREAD` of its value;
- `holdout`: every held-out size is predicted within `HOLDOUT_ERROR` and lies inside its band;
- `falls`: the mean loss falls at every step in N (at each token count).

The two thresholds are issue 11's bar for the quickstart. A check that cannot be made (no
bootstrap, no held-out size, one size per token count) is `None`: not passed, not failed. numpy
only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from bitnet_jax.scaling.holdout import HeldOut
from bitnet_jax.scaling.laws import AT_BOUND, Fit
from bitnet_jax.scaling.noise import Replicates

__all__ = ["EXPONENT_SPREAD", "HOLDOUT_ERROR", "CHECKS", "Check", "law_checks", "trusted"]

EXPONENT_SPREAD = 0.5  # an exponent's 95% interval within +-50% of its value
HOLDOUT_ERROR = 0.015  # a held-out size predicted within 1.5% of its observed loss
EXPONENTS = ("alpha", "beta")

# Each check's name and what passing it means (the report's column heads).
CHECKS = {
    "bounds": "no parameter at a bound",
    "resamples": "no failed resamples",
    "exponents": f"exponent intervals within +-{EXPONENT_SPREAD:.0%}",
    "holdout": f"held out within {HOLDOUT_ERROR:.1%}, inside the band",
    "falls": "loss falls with N",
}


@dataclass(frozen=True)
class Check:
    """One check of one law: `passed` is True, False or None (could not be made); `detail` says
    what was measured."""

    name: str
    passed: Optional[bool]
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "detail": self.detail}


def _bounds(fit: Fit) -> Check:
    if AT_BOUND not in fit.info:
        return Check("bounds", None, "the fitter does not report its bounds")
    at = list(fit.info[AT_BOUND])
    return Check("bounds", not at, "at a bound: " + ", ".join(at) if at else "none at a bound")


def _resamples(fit: Fit) -> Check:
    if fit.samples is None:
        return Check("resamples", None, "no bootstrap")
    total = len(fit.samples) + fit.n_boot_failed
    return Check("resamples", fit.n_boot_failed == 0, f"{fit.n_boot_failed} of {total} failed")


def _exponents(fit: Fit) -> Check:
    names = [n for n in EXPONENTS if n in fit.params and n in fit.intervals]
    if not names:
        return Check("exponents", None, "no bootstrap intervals")
    spreads = {n: (fit.intervals[n][1] - fit.intervals[n][0]) / 2 / abs(fit.params[n])
               if fit.params[n] else float("inf") for n in names}
    detail = "; ".join(f"{n} {fit.params[n]:.3g} [{fit.intervals[n][0]:.3g}, "
                       f"{fit.intervals[n][1]:.3g}]: +-{spreads[n]:.0%}" for n in names)
    return Check("exponents", all(s <= EXPONENT_SPREAD for s in spreads.values()), detail)


def _holdout(held: Sequence[HeldOut]) -> Check:
    if not held:
        return Check("holdout", None, "no size held out")
    if any(h.inside is None for h in held):
        return Check("holdout", None, "held-out bands need a bootstrap")
    passed = all(abs(h.rel_error) <= HOLDOUT_ERROR and h.inside for h in held)
    detail = "; ".join(f"N = {h.N:.4g}: {h.rel_error:+.2%}, "
                       + ("inside" if h.inside else "outside") for h in held)
    return Check("holdout", passed, detail)


def _falls(replicates: Replicates) -> Check:
    n = replicates.x[0]
    d = replicates.x[1] if len(replicates.x) > 1 else np.zeros_like(n)
    rises, steps = [], 0
    for tokens in np.unique(d):
        at = np.flatnonzero(d == tokens)
        at = at[np.argsort(n[at], kind="stable")]
        means = replicates.means[at]
        steps += len(at) - 1
        rises += [f"N = {n[i]:.4g} to {n[j]:.4g}: {means[k + 1] - means[k]:+.4f}"
                  for k, (i, j) in enumerate(zip(at[:-1], at[1:])) if means[k + 1] >= means[k]]
    if not steps:
        return Check("falls", None, "one size per token count")
    return Check("falls", not rises, "rises at " + "; ".join(rises) if rises
                 else f"falls at all {steps} steps")


def law_checks(fit: Fit, held: Sequence[HeldOut], replicates: Replicates) -> tuple[Check, ...]:
    """The checks of `CHECKS` for one law: its bootstrapped fit on every size, its held-out
    predictions and the per-size losses it was fitted to."""
    return (_bounds(fit), _resamples(fit), _exponents(fit), _holdout(held), _falls(replicates))


def trusted(checks: Sequence[Check]) -> bool:
    """Every check made and passed (no checks: nothing was shown)."""
    return bool(checks) and all(c.passed is True for c in checks)


def checks_table(checks: dict[str, dict[str, Sequence[Check]]]) -> list[str]:
    """Markdown rows: one per (recipe, law) of `checks` (recipe -> law name -> its checks), a
    column per check ("yes", "**no**" or "-" for not made, each with what was measured)."""
    mark = {True: "yes", False: "**no**", None: "-"}
    lines = ["| recipe | law | " + " | ".join(CHECKS.values()) + " | usable |",
             "|---|---|" + "---|" * (len(CHECKS) + 1)]
    for recipe, laws in checks.items():
        for name, law in laws.items():
            by_name = {c.name: c for c in law}
            cells = [f"{mark[by_name[k].passed]}: {by_name[k].detail}" if k in by_name else "-"
                     for k in CHECKS]
            lines.append(f"| {recipe} | {name} | " + " | ".join(cells)
                         + f" | {'yes' if trusted(law) else '**no**'} |")
    return lines
