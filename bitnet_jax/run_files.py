"""The names of the files in a run directory, in one place.

A run directory `out_dir/<name>/` is written by training (`bitnet_jax.train.loop`) and by
imports (`bitnet_jax.interop.run_dir.save_run`), and read by sweeps, reports, generation and
exports. Every one of them names its files through these constants, so a file can be renamed
in one line. A leaf module (no imports) so that data/, train/, scaling/ and interop/ can all use
it without importing each other.
"""

CONFIG_FILE = "config.yaml"  # the run config, complete (`bitnet train --config` reads it back)
META_FILE = "meta.json"  # who ran it where: versions, devices, host (or the import's source)
METRICS_FILE = "metrics.jsonl"  # one JSON record per logged train step and per evaluation
SUMMARY_FILE = "summary.json"  # written at the end: status, final eval, throughput, accounting
CHECKPOINT_DIR = "checkpoints"  # orbax steps: train state, data position, checkpoint meta
TOKENIZER_FILE = "tokenizer.json"  # an HF tokenizer copied into a model directory
LAUNCH_LOG = "launch.log"  # stdout and stderr of a run started by a sweep launcher
LM_EVAL_FILE = "lm_eval.json"  # a sweep's lm-eval scores of the run, with the spec that made them
