"""Will a ladder's law be usable? Simulate its table before paying for the sweep.

Draws results tables from a known law L(N) = E + A N^-alpha with the noise of single runs
(lognormal, `--noise` as a fraction of the loss), for each candidate design (sizes from N_min to
N_max, geometric; seeds per size), fits each draw with the framework's own fitter (`fit_table`:
the same bootstrap from the seed spread, the same held-out largest size, the same `trust` checks
as a sweep report) and prints, per design, how often each check passed and the median relative
half-width of alpha's interval. A design whose checks fail on data drawn from the very law it
fits will not pass them on a real sweep. The law defaults to the bf16 fit of cpu_scaling.yaml's
first run (2026-12-02: 8 sizes, 3 seeds); the noise to its seed spread.

    python scripts/ladder_design.py                          # the designs README discusses
    python scripts/ladder_design.py --design 3e3:8e5:8:3 --design 1.3e4:2.2e5:5:2 --draws 20

Writes the table as JSON (`--out`, default ladder_design.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np

from bitnet_jax.scaling.fit import fit_table
from bitnet_jax.scaling.trust import CHECKS

# cpu_scaling.yaml now (7 sizes, 5 seeds) and with 3 seeds, its first run (8 sizes to 822K,
# 3 seeds), its earlier standard-parametrization design, the quickstart's range.
DEFAULT_DESIGNS = ("3.35e3:4.63e5:7:5", "3.35e3:4.63e5:7:3", "3.35e3:8.22e5:8:3",
                   "3.5e4:5.3e5:6:3", "1.35e4:2.22e5:5:2")


def parse_design(text: str) -> tuple[float, float, int, int]:
    """'N_min:N_max:sizes:seeds' -> its four numbers."""
    try:
        n_min, n_max, sizes, seeds = text.split(":")
        design = float(n_min), float(n_max), int(sizes), int(seeds)
    except ValueError:
        raise SystemExit(f"error: --design {text!r}: give N_min:N_max:sizes:seeds, "
                         "e.g. 3e3:8e5:8:3") from None
    if not (0 < design[0] < design[1] and design[2] >= 5 and design[3] >= 1):
        raise SystemExit(f"error: --design {text!r}: need 0 < N_min < N_max, at least 5 sizes "
                         "(4 to fit L(N) after one is held out) and at least 1 seed")
    return design


def draw_table(design: tuple[float, float, int, int], law: dict[str, float], noise: float,
               rng: np.random.Generator) -> list[dict]:
    n_min, n_max, sizes, seeds = design
    mean = lambda n: law["E"] + law["A"] * n ** -law["alpha"]  # noqa: E731
    return [{"params": float(n), "seed": s, "recipe": "law",
             "loss": float(mean(n) * np.exp(rng.normal(0.0, noise)))}
            for n in np.geomspace(n_min, n_max, sizes) for s in range(seeds)]


def score_design(design, law, noise, draws, n_boot, seed) -> dict:
    rng = np.random.default_rng(seed)
    passed = {name: 0 for name in CHECKS}
    usable, spreads = 0, []
    for _ in range(draws):
        fit = fit_table(draw_table(design, law, noise, rng), n_boot=n_boot,
                        chinchilla=False)["law"].laws["L(N)"]
        for check in fit.checks:
            passed[check.name] += check.passed is True
        usable += fit.trusted
        low, high = fit.fit.intervals["alpha"]
        spreads.append((high - low) / 2 / fit.fit.params["alpha"])
    return {"n_min": design[0], "n_max": design[1], "sizes": design[2], "seeds": design[3],
            "draws": draws, "usable": usable / draws,
            "passed": {name: k / draws for name, k in passed.items()},
            "alpha_half_width_median": float(np.median(spreads))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--design", action="append", metavar="N_MIN:N_MAX:SIZES:SEEDS",
                        help=f"repeatable (default: {', '.join(DEFAULT_DESIGNS)})")
    parser.add_argument("--E", type=float, default=1.564)
    parser.add_argument("--A", type=float, default=4.012)
    parser.add_argument("--alpha", type=float, default=0.227)
    parser.add_argument("--noise", type=float, default=0.0117,
                        help="sd of one run's log loss (default: cpu_scaling.yaml's first run, "
                             "pooled bf16)")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ladder_design.json")
    args = parser.parse_args(argv)
    designs = [parse_design(d) for d in (args.design or DEFAULT_DESIGNS)]
    law = {"E": args.E, "A": args.A, "alpha": args.alpha}
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    print(f"law E={args.E} A={args.A} alpha={args.alpha}, noise {args.noise:.1%} per run, "
          f"{args.draws} draws x {args.bootstrap} resamples", file=sys.stderr)
    header = (f"{'N range':>19} {'sizes':>5} {'seeds':>5} {'usable':>7} "
              + " ".join(f"{name:>9}" for name in CHECKS) + f" {'alpha +-':>9}")
    print(header)
    rows = []
    for design in designs:
        start = time.perf_counter()
        row = score_design(design, law, args.noise, args.draws, args.bootstrap, args.seed)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{design[0]:>9.3g}-{design[1]:<9.3g} {design[2]:>5} {design[3]:>5} "
              f"{row['usable']:>7.0%} "
              + " ".join(f"{row['passed'][name]:>9.0%}" for name in CHECKS)
              + f" {row['alpha_half_width_median']:>9.0%}")
    with open(args.out, "w") as f:
        json.dump({"law": law, "noise": args.noise, "bootstrap": args.bootstrap,
                   "designs": rows}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
