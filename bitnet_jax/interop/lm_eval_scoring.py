"""lm-eval where it may be absent: the adapter imported on demand, and a sweep run's scores.

lm-evaluation-harness is an optional extra (`pip install 'bitnet-jax[eval]'`), so nothing imports
`interop.lm_eval_adapter` at load time: `adapter()` imports it or says in one line how to install
it. `score_finished_run` is what a sweep's job does after training when the sweep names tasks
(`bitnet train --lm-eval SPEC.json`, see `scaling.downstream`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bitnet_jax.errors import ConfigError
from bitnet_jax.files import read_json_object
from bitnet_jax.scaling.downstream import EvalSpec

__all__ = ["adapter", "score_finished_run"]


def adapter():
    """The `interop.lm_eval_adapter` module, or a ConfigError naming the extra to install."""
    try:
        from bitnet_jax.interop import lm_eval_adapter
    except ModuleNotFoundError as missing:
        raise ConfigError(f"scoring on lm-eval tasks needs lm-evaluation-harness ({missing}); "
                          f"install it with `pip install 'bitnet-jax[eval]'`") from None
    return lm_eval_adapter


def score_finished_run(run_dir: Path, spec_path: str | Path) -> int:
    """Score a finished run on a sweep's tasks into its lm_eval.json; the exit code (1 with
    one error line if lm-eval fails; ConfigErrors are left to the CLI's handler)."""
    spec = EvalSpec.from_json(read_json_object(spec_path, "lm-eval spec"))
    lm_eval_adapter = adapter()
    print(f"scoring {run_dir.name} on lm-eval tasks {', '.join(spec.tasks)}", flush=True)
    try:
        path = lm_eval_adapter.score_run(run_dir, spec)
    except ConfigError:
        raise
    except Exception as error:  # lm-eval and its datasets raise anything; say it in one line
        print(f"error: lm-eval scoring of {run_dir.name} failed: {type(error).__name__}: "
              f"{error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
