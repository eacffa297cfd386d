"""The `bitnet` command (the tables of `bitnet info` are `model/info_text.py`).

Subcommands: `info` (compute accounting of a preset), `train` (one training run),
`tokenizer train` (a BPE tokenizer for a corpus), `sweep` and `fit` (scaling laws),
`generate` (text from a trained, packed or Hugging Face model), `export-hf` / `import-hf`
(transformers' BitNet format), `export-gguf` (llama.cpp) and `pack` (2-bit / 1.6-bit ternary
checkpoints).

Errors meant for people (`ConfigError`, and `ValueError`s from unknown names in `info`) are printed
as one `error: ...` line on stderr with exit code 2, never as a traceback.

Run as a command, it starts itself again once with tcmalloc preloaded where that is installed
(`allocator.py`: XLA:CPU's training steps ran 1.28-1.34x faster with it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from bitnet_jax.model import accounting as compute
from bitnet_jax.errors import EXIT_USAGE, ConfigError
from bitnet_jax.model.info_text import format_summary, list_presets
from bitnet_jax.units import format_bytes
from bitnet_jax.files import require_apart
from bitnet_jax.platforms import prepare_process, skip_absent_tpu
from bitnet_jax.scaling import results  # column names only (the csv module, no JAX)
from bitnet_jax.scaling.select import SELECT_BY  # pure Python: the envelope's modes


# ----------------------------------------------------------------------------------------------
# Subcommands.

def cmd_info(args: argparse.Namespace) -> int:
    if args.list:
        print(list_presets())
        return 0
    if args.model is None:
        raise ConfigError("info needs --model PRESET (see `bitnet info --list` for the names)")
    from bitnet_jax.model.transformer import get_model_config
    from bitnet_jax.core.precision import get_recipe

    config = get_model_config(args.model)
    try:  # unknown recipe names and impossible arguments (e.g. --seq-len 0)
        recipe = get_recipe(args.precision)
        summary = {"model": args.model, **compute.summarize(config, recipe, args.seq_len)}
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(args.model, summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitnet", description="Scaling-law experiments on BitNet ternary LMs in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser(
        "info", help="parameters, FLOPs, energy and memory of a model preset",
        description="Compute accounting of a preset under a precision recipe (no JAX compute).")
    info.add_argument("--model", metavar="PRESET", help="model preset, e.g. bitnet-2b4t")
    info.add_argument("--precision", metavar="RECIPE", default="b1.58",
                      help="precision recipe, e.g. bf16, b1.58, a4.8, w4a8 (default: b1.58)")
    info.add_argument("--seq-len", type=int, default=None, metavar="N",
                      help="attention span for FLOPs and energy (default: the preset's max_seq_len)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--list", action="store_true", help="list model presets and recipes")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser(
        "train", help="train one model (resumes from its latest checkpoint)",
        description="Train one run from a YAML config; key=value arguments override fields, "
                    "e.g. train.steps=200 precision=bf16 model.d_model=128.")
    train.add_argument("--config", metavar="FILE.yaml", help="run config (default: all defaults)")
    train.add_argument("--lm-eval", metavar="SPEC.json", default=None,
                       help="then score the finished run on lm-eval tasks into its lm_eval.json "
                            "(a sweep's `eval:` block, as `bitnet sweep run` writes it)")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=cmd_train)

    tokenizer = sub.add_parser("tokenizer", help="tokenizer utilities")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True,
                                             metavar="ACTION")
    tok_train = tokenizer_sub.add_parser(
        "train", help="train a byte-level BPE on a config's corpus",
        description="Train a byte-level BPE (HF tokenizers) on the training split of the "
                    "corpus a config names; use it with data.tokenizer=PATH.")
    tok_train.add_argument("--config", metavar="FILE.yaml")
    tok_train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    tok_train.add_argument("--out", required=True, metavar="PATH",
                           help="where to write tokenizer.json")
    tok_train.add_argument("overrides", nargs="*", metavar="key=value")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    sweep = sub.add_parser("sweep", help="plan, run, collect and report a sweep of runs")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="ACTION")
    sweep_plan = sweep_sub.add_parser(
        "plan", help="print the runs with parameters, FLOPs and estimated time (runs nothing)")
    sweep_plan.add_argument("file", metavar="SWEEP.yaml")
    sweep_plan.add_argument("--flops-per-second", type=float, default=None,
                            help="sustained training FLOP/s for the time estimate (default: "
                                 "--mfu times a bf16 matmul peak measured here)")
    sweep_plan.add_argument("--mfu", type=float, default=0.2,
                            help="assumed MFU for the estimate (default 0.2)")
    sweep_plan.add_argument("--compile", action="store_true",
                            help="compile every run's train step ahead of time for the target "
                                 "and show bytes per device, compiled FLOPs and whether it fits")
    sweep_plan.add_argument("--topology", default=None, metavar="NAME",
                            help="with --compile: a TPU slice such as v5e:16x16, v5p:4x4x4 or "
                                 "v4:2x2x4 (needs libtpu: pip install -e '.[tpu]'); default: "
                                 "the local devices")
    sweep_plan.add_argument("--json", action="store_true", help="print the rows as JSON")
    sweep_run = sweep_sub.add_parser(
        "run", help="run every unfinished run, then collect the table and write the report")
    sweep_run.add_argument("file", metavar="SWEEP.yaml")
    sweep_run.add_argument("--launcher", choices=("local", "slurm", "print"), default="local")
    sweep_run.add_argument("--workers", type=int, default=1,
                           help="local: runs at once, each pinned to its share of the CPU cores")
    sweep_run.add_argument("--retry-failed", action="store_true",
                           help="run failed and diverged runs again (from scratch)")
    sweep_run.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                           help="slurm: an sbatch option, e.g. --sbatch partition=gpu "
                                "--sbatch gres=gpu:1 (repeatable)")
    sweep_run.add_argument("--wait", action="store_true",
                           help="slurm: wait for the array job, then collect and report")
    for name, text in (("collect", "build results.csv / results.parquet from the run directories"),
                       ("report", "collect, fit the scaling laws and write report.md with plots")):
        action = sweep_sub.add_parser(name, help=text)
        action.add_argument("file", metavar="SWEEP.yaml")
    for name in ("run", "report"):
        sweep_sub.choices[name].add_argument(
            "--bootstrap", type=int, default=None, metavar="N",
            help="bootstrap resamples of every law in the report (default: the fitter's; fewer "
                 "is faster and gives rougher intervals)")
    for action in sweep_sub.choices.values():
        action.add_argument("overrides", nargs="*", metavar="key=value",
                            help="overrides applied to the sweep's base config")
    sweep.set_defaults(func=cmd_sweep)

    fit = sub.add_parser("fit", help="fit scaling laws to any results table (CSV)",
                         description="Fit L(N), the pure power law and L(N, D) per recipe to a "
                                     "results table, e.g. one from another framework: the best "
                                     "run over swept hyperparameters per size, bootstrap "
                                     "intervals (from the seed spread where sizes have several "
                                     "seeds) and predictions of the largest sizes from the "
                                     "others.")
    fit.add_argument("table", metavar="TABLE.csv")
    for flag, names in (("--params-column", results.PARAM_COLUMNS),
                        ("--tokens-column", results.TOKEN_COLUMNS),
                        ("--loss-column", results.LOSS_COLUMNS),
                        ("--recipe-column", results.RECIPE_COLUMNS)):
        fit.add_argument(flag, default=None,
                         help=f"default: the first present of {', '.join(names)}")
    fit.add_argument("--bootstrap", type=int, default=None,
                     help="bootstrap resamples (default: the fitter's, as in `sweep report`)")
    fit.add_argument("--holdout", type=int, default=None, metavar="K",
                     help="fit each law without the K largest sizes (by compute where D varies) "
                          "and predict them (default: the fitter's, as in `sweep report`)")
    fit.add_argument("--hyperparameter", action="append", default=None, metavar="KEY",
                     help="a swept key (or column, e.g. lr) to take the best run over per size "
                          "(repeatable; default: every swept key in the `axes` column that is "
                          "not size, tokens, precision or seed)")
    fit.add_argument("--select-by", choices=SELECT_BY, default=SELECT_BY[0],
                     help="where sizes have seeds: the best setting per seed (default), or the "
                          "best mean over the seeds, every seed kept at it")
    fit.add_argument("--law", choices=("precision", "qat-gap"), default=None,
                     help="fit one precision law across recipes instead of the laws per recipe: "
                          "Kumar et al.'s effective parameters (precision) or Chen et al.'s QAT "
                          "gap per bit setting (qat-gap); reads the weight_bits, act_bits, "
                          "kv_bits and group_size columns, and compares the models by held-out "
                          "error")
    fit.add_argument("--json", action="store_true",
                     help="print the fits as one JSON object (the schema of fits.json)")
    fit.set_defaults(func=cmd_fit)

    generate = sub.add_parser(
        "generate", help="generate text with a KV cache from a run, packed or HF directory",
        description="Continue prompts with a trained run (config.yaml), a packed checkpoint "
                    "(bitnet pack) or a Hugging Face BitNet directory. Ternary models run "
                    "with int8 ternary weights and int8 x int8 -> int32 products by default.")
    generate.add_argument("model_dir", metavar="RUN_OR_HF_DIR")
    generate.add_argument("--prompt", action="append", required=True,
                          help="a prompt (repeat for a batch)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--weights", choices=("auto", "float", "int8", "packed"),
                          default="auto", help="how quantized weights are held (default: int8 "
                                               "codes for ternary and other <= 8-bit recipes)")
    generate.add_argument("--head", choices=("float", "int8"), default="float",
                          help="int8: the output head as int8 rows with int8 x int8 products "
                               "(half a bf16 head's bytes; logits move by ~1%%)")
    generate.add_argument("--kv-bits", type=int, default=None,
                          help="quantize the KV cache to this many bits (a4.8 uses 3)")
    generate.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                          help="compute dtype (default: the model's)")
    generate.add_argument("--no-stop", action="store_true",
                          help="do not stop at the end-of-document token")
    generate.set_defaults(func=cmd_generate)

    export = sub.add_parser(
        "export-hf", help="write a run as a transformers BitNetForCausalLM directory",
        description="config.json + model.safetensors that transformers loads as "
                    "BitNetForCausalLM: float weights quantized online, or --packed 2-bit "
                    "weights with weight_scale (the microsoft/bitnet-b1.58-2B-4T format).")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--packed", action="store_true", help="2-bit packed ternary weights")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the float tensors (default float32, exact)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=cmd_export_hf)

    gguf_export = sub.add_parser(
        "export-gguf", help="write a run, packed or HF directory as a GGUF file for llama.cpp",
        description="A GGUF file that llama.cpp loads as its `bitnet` (subln) or `llama` (pre) "
                    "architecture, tokenizer included; other architectures are refused with the "
                    "reason (see bitnet_jax/interop/gguf.py).")
    gguf_export.add_argument("model_dir", metavar="RUN")
    gguf_export.add_argument("out_path", metavar="OUT.gguf")
    gguf_export.add_argument("--type", dest="qtype", default="tq2_0",
                             choices=("tq1_0", "tq2_0", "f16", "bf16", "f32"),
                             help="type of the decoder's linear weights (default tq2_0)")
    gguf_export.add_argument("--head-type", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                             help="type of the embedding / output head (default: f16 for tq "
                                  "types, else --type)")
    gguf_export.add_argument("--overwrite", action="store_true")
    gguf_export.set_defaults(func=cmd_export_gguf)

    import_ = sub.add_parser(
        "import-hf", help="read a Hugging Face BitNet directory into a run directory",
        description="Import a BitNetForCausalLM checkpoint (float, online-quantized or packed; "
                    "bf16 or f32; tied or untied) as a run directory for `generate`, "
                    "evaluation and `bitnet train init_from=OUT_DIR`.")
    import_.add_argument("hf_dir", metavar="HF_DIR")
    import_.add_argument("out_dir", metavar="OUT_DIR")
    import_.add_argument("--tokenizer", default=None,
                         help="'bytes' or a tokenizer.json (default: the one in HF_DIR)")
    import_.add_argument("--overwrite", action="store_true")
    import_.set_defaults(func=cmd_import_hf)

    evaluate = sub.add_parser(
        "eval", help="score a run, packed or HF directory on lm-evaluation-harness tasks",
        description="Run lm-evaluation-harness tasks (its registry, or YAML tasks in "
                    "--include-path over local JSON/JSONL files) with our model and tokenizer.")
    evaluate.add_argument("model_dir", metavar="RUN_OR_HF_OR_PACKED_DIR")
    evaluate.add_argument("--tasks", required=True, help="comma-separated task, group or tag names")
    evaluate.add_argument("--include-path", default=None, metavar="DIR",
                          help="a directory of extra lm-eval task YAML files")
    evaluate.add_argument("--limit", type=float, default=None,
                          help="at most N documents per task (a fraction if < 1)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--num-fewshot", type=int, default=None)
    evaluate.add_argument("--weights", choices=("auto", "float", "int8", "packed"),
                          default="auto", help="how quantized weights are held (as in generate)")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                          help="compute dtype (default float32)")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.set_defaults(func=cmd_eval)

    pack = sub.add_parser(
        "pack", help="store a ternary run's weights as packed codes (2-bit or base-3)",
        description="Quantize a ternary run once and write model.safetensors + "
                    "bitnet_packed.json with the codes packed; prints the size table.")
    pack.add_argument("run_dir", metavar="RUN_DIR")
    pack.add_argument("--out", required=True, metavar="DIR")
    pack.add_argument("--layout", choices=("2bit", "base3"), default="2bit")
    pack.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                      help="storage of embeddings, norms and the head (default bfloat16)")
    pack.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    pack.add_argument("--overwrite", action="store_true")
    pack.set_defaults(func=cmd_pack)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from bitnet_jax.data.tokenizers import load_tokenizer
    from bitnet_jax.infer import generate as inference
    from bitnet_jax.infer.sampling import SamplingConfig

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    bundle, generator = inference.load_generator(args.model_dir, args.weights,
                                                 kv_bits=args.kv_bits, dtype=args.dtype,
                                                 head=args.head)
    tokenizer = load_tokenizer(bundle.tokenizer)
    print(f"# {bundle.precision} model, {generator.weights} weights"
          f"{', integer products' if generator.integer else ''}"
          f"{', int8 head' if generator.head == 'int8' else ''}"
          f"{f', {args.kv_bits}-bit KV cache' if args.kv_bits else ''}", file=sys.stderr)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    result = inference.generate(generator, prompts, args.max_new_tokens, sampling, args.seed,
                                stop_id=None if args.no_stop else tokenizer.eod_id)
    for text, tokens in zip(args.prompt, result.tokens):
        print(text + tokenizer.decode(tokens))
    print(f"# prefill {result.prefill_seconds:.2f} s (includes compilation); decode "
          f"{result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from bitnet_jax.interop.run_dir import load_run, read_resolved_run
    from bitnet_jax.interop.hf import check_exportable, export_hf

    if args.overwrite:
        require_apart(args.out_dir, [args.run_dir])
    run = read_resolved_run(args.run_dir)
    check_exportable(run.model, run.config.precision, args.packed)  # before reading weights
    summary = export_hf(load_run(args.run_dir, args.step), args.out_dir, args.packed,
                        args.dtype, args.overwrite)
    print(f"wrote {summary['out_dir']} ({summary['format']}, {args.dtype}): "
          f"{format_bytes(summary['bytes'])}; linear weights "
          f"{format_bytes(summary['linear_weight_bytes'])} "
          f"(bf16: {format_bytes(summary['linear_weight_bytes_bf16'])})")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from bitnet_jax.interop.gguf import export_gguf
    from bitnet_jax.interop.load import load_model

    summary = export_gguf(load_model(args.model_dir), args.out_path, args.qtype, args.head_type,
                          args.overwrite)
    print(f"wrote {summary['path']} (llama.cpp {summary['architecture']}, {summary['type']} "
          f"linears, {summary['head_type']} head): {format_bytes(summary['bytes'])}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from bitnet_jax.interop.hf import import_hf

    if args.overwrite:  # (a tokenizer inside OUT_DIR is safe: it is read before replacing)
        require_apart(args.out_dir, [args.hf_dir])
    out = import_hf(args.hf_dir, args.out_dir, args.overwrite, tokenizer=args.tokenizer)
    print(f"wrote run directory {out}; continue training with "
          f"`bitnet train --config {out}/config.yaml` (it starts from these weights)")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from bitnet_jax.interop.run_dir import load_run, read_resolved_run
    from bitnet_jax.interop.packed import format_size_report, require_ternary, save_packed

    if args.overwrite:
        require_apart(args.out, [args.run_dir])
    require_ternary(read_resolved_run(args.run_dir).recipe)  # before loading the weights
    report = save_packed(load_run(args.run_dir, args.step), args.out, args.layout, args.dtype,
                         overwrite=args.overwrite)
    print(format_size_report(report))
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bitnet_jax.interop.lm_eval_scoring import adapter

    lm_eval_adapter = adapter()
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = lm_eval_adapter.evaluate(
        args.model_dir, [t.strip() for t in args.tasks.split(",") if t.strip()],
        args.include_path, limit, args.batch_size, args.num_fewshot, args.weights, args.dtype)
    print(lm_eval_adapter.results_json(results) if args.json
          else lm_eval_adapter.format_results(results))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bitnet_jax.scaling import sweep as sweeps

    sweep = sweeps.load_sweep(args.file, args.overrides)
    if args.sweep_command == "plan" and args.compile:
        from bitnet_jax.scaling import compile_plan

        rows = compile_plan.compile_plan(sweep, args.topology)
        print(compile_plan.to_json(rows) if args.json
              else compile_plan.format_compile_plan(sweep, rows))
        return 0
    if args.sweep_command == "plan":
        if args.topology is not None:
            raise ConfigError("sweep plan: --topology needs --compile")
        rate = args.flops_per_second
        if rate is None:
            from bitnet_jax.train.metrics import measure_matmul_peak

            rate = args.mfu * measure_matmul_peak()
        rows = sweeps.plan(sweep, rate)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(sweeps.format_plan(sweep, rows))
        print(f"(time estimated at {rate / 1e12:.3g} TFLOP/s sustained)")
        return 0
    failures: list[dict] = []
    if args.sweep_command == "run":
        if sweep.eval is not None and args.launcher != "print":  # a misspelt task fails now,
            # not after every run has trained
            from bitnet_jax.interop.lm_eval_scoring import adapter

            adapter().task_manager_for(sweep.eval.tasks, sweep.eval.include_path)
        options = dict(_key_value(item, "--sbatch") for item in args.sbatch)
        outcome = sweeps.run_sweep(sweep, args.launcher, args.workers, args.retry_failed,
                                   options, args.wait)
        for run_id, status in outcome["skipped"].items():
            print(f"skipped {run_id}: {status}" + (" (use --retry-failed to run it again)"
                                                   if status in sweeps.FAILED else ""))
        if args.launcher == "print":
            print(outcome.get("commands", ""))
            return 0
        if args.launcher == "slurm":
            submission = outcome.get("slurm")
            if submission is not None:
                print(f"submitted SLURM array job {submission.job_id} with "
                      f"{submission.n_tasks} tasks ({submission.script_path})")
            if not args.wait:
                print(f"when it is done: bitnet sweep report {args.file}")
                return 0
        failures = outcome.get("failures", [])
    if args.sweep_command == "collect":
        rows = sweeps.collect(sweep)
        print(f"wrote {sweep.directory / 'results.csv'} and results.parquet ({len(rows)} runs)")
        return 0
    from bitnet_jax.scaling import report

    path = report.write_report(sweep, args.bootstrap)
    print(f"wrote {path}")
    for failure in failures:  # the report is written; the command still says it went wrong
        print(f"error: run {failure['run']} {failure['status']}: {failure['error']}",
              file=sys.stderr)
    return 1 if failures else 0


def _key_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{flag} {text!r} must look like key=value, e.g. partition=gpu")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def cmd_fit(args: argparse.Namespace) -> int:
    import json

    from bitnet_jax.scaling.fit import fit_table, fits_json, format_fits, require_a_fit

    # The one fitter, with its own defaults: `bitnet sweep report` prints the same laws.
    given = {"n_boot": args.bootstrap, "holdout": args.holdout}
    if args.law is not None:
        from bitnet_jax.scaling.precision_fit import (fit_precision_table, format_precision,
                                                      precision_json)

        result = fit_precision_table(
            args.table, law=args.law, params_column=args.params_column,
            tokens_column=args.tokens_column, loss_column=args.loss_column,
            recipe_column=args.recipe_column, hyperparameters=args.hyperparameter,
            **{k: v for k, v in given.items() if v is not None})
        print(json.dumps({"precision": precision_json(result)}, indent=2) if args.json
              else format_precision(result))
        return 0
    fits = fit_table(args.table, params_column=args.params_column,
                     tokens_column=args.tokens_column, loss_column=args.loss_column,
                     recipe_column=args.recipe_column, hyperparameters=args.hyperparameter,
                     select_by=args.select_by, **{k: v for k, v in given.items() if v is not None})
    require_a_fit(fits, args.table)
    print(json.dumps(fits_json(fits), indent=2) if args.json else format_fits(fits))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bitnet_jax.config import load_config
    from bitnet_jax.train.checkpoint import CheckpointSaveError
    from bitnet_jax.train.loop import TrainingDiverged, TrainingInterrupted, train

    config = load_config(args.config, args.overrides)
    try:
        summary = train(config)
    except TrainingDiverged as error:
        print(f"error: training diverged: {error}", file=sys.stderr)
        return 1
    except CheckpointSaveError as error:  # one write: orbax's threads may still be logging
        sys.stderr.write(f"error: {error}\n")
        sys.stderr.flush()
        return 1
    except TrainingInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 130
    print(json.dumps({k: summary.get(k) for k in ("run", "status", "step", "eval_loss",
                                                   "eval_ppl", "eval_bpb", "tokens_per_s")}))
    if args.lm_eval is not None and summary.get("status") == "completed":
        from bitnet_jax.interop.lm_eval_scoring import score_finished_run

        return score_finished_run(Path(config.out_dir) / summary["run"], args.lm_eval)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from bitnet_jax.config import load_config
    from bitnet_jax.data.corpus import load_corpus
    from bitnet_jax.data.tokenizers import train_bpe

    config = load_config(args.config, args.overrides)
    path = train_bpe(load_corpus(config.data), args.vocab_size, args.out)
    print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `bitnet` command; returns the exit code (0 ok, 2 usage or config error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage and its error line
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    if argv is None:  # the command itself, not a call from Python
        prepare_process(["-m", "bitnet_jax.cli", *sys.argv[1:]])
    else:
        skip_absent_tpu()
    try:
        return func(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a file the readers did not reach: still one line naming it
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}; check the path, its permissions and "
              f"free space", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
