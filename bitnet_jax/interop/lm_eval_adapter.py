"""Downstream scores through lm-evaluation-harness: our models as an `lm_eval` model.

`BitnetLM` (registered in lm-eval as "bitnet") scores any run, packed or Hugging Face directory
with our own Transformer and tokenizer. It subclasses lm-eval's `TemplateLM`, so the text ->
token bookkeeping (moving a context's trailing spaces into the continuation, the prefix token
for an empty context, rolling windows) is lm-eval's own, exactly what its `hf` model does;
only the model calls are ours:

- loglikelihood / loglikelihood_rolling: one jitted forward pass per batch returns each target
  token's log-probability and whether it is the argmax. Rows are right-padded (a causal model's
  logits do not see later positions, so no mask is needed), to a length bucket (powers of two up
  to max_length) and a fixed number of rows, so a whole task compiles a handful of times.
- generate_until: `infer.generate.generate`, batched and left-padded with a KV cache.

`evaluate` runs tasks with lm-eval's `TaskManager` and `simple_evaluate`; `format_results` is
lm-eval's own table. Weights are held as `bitnet generate` holds them (`weights="auto"`: int8
codes and integer products for ternary recipes); scores are computed in float32 unless
`dtype` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from bitnet_jax import run_files
from bitnet_jax.data.tokenizers import load_tokenizer
from bitnet_jax.errors import require
from bitnet_jax.files import write_text_atomic
from bitnet_jax.infer.generate import Generator, generate, load_generator  # loads any model dir
from bitnet_jax.infer.sampling import SamplingConfig

MIN_BUCKET = 16


def bucket_length(length: int, cap: int) -> int:
    """The padded length of a row of `length` tokens: the next power of two (at least
    MIN_BUCKET), never beyond `cap`."""
    require(0 < length <= cap, f"a row of {length} tokens does not fit max_length={cap}")
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), cap)


def right_padded(rows: Sequence[Sequence[int]], length: int,
                 n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets (n_rows, length), each row's tokens first, zeros after.

    A row holds the sequence s; its inputs are s[:-1] and its targets s[1:]."""
    inputs = np.zeros((n_rows, length), np.int32)
    targets = np.zeros((n_rows, length), np.int32)
    for i, row in enumerate(rows):
        inputs[i, :len(row) - 1] = row[:-1]
        targets[i, :len(row) - 1] = row[1:]
    return inputs, targets


def _token_scorer(generator: Generator):
    """A jitted (params, inputs, targets) -> (log p(target), target is the argmax), (B, T) each."""
    model = generator.model

    def score(params, inputs_BxT, targets_BxT):
        logits_BxTxV = model.apply({"params": params}, inputs_BxT).astype(jnp.float32)
        logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        target_BxT = jnp.take_along_axis(logprobs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
        return target_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT

    return jax.jit(score)


@register_model("bitnet")
class BitnetLM(TemplateLM):
    """An lm-eval model over a run, packed or Hugging Face directory (`pretrained`).

    lm-eval passes `batch_size`, `max_batch_size` and `device` to every model; `device` is
    JAX's default device here, and an "auto" batch size is `batch_size` 8.
    """

    def __init__(self, pretrained: str, batch_size: int | str = 8, weights: str = "auto",
                 dtype: str = "float32", max_length: Optional[int] = None,
                 max_batch_size: Optional[int] = None, device: Optional[str] = None):
        super().__init__()
        del max_batch_size, device  # one JAX process, its default devices
        self.bundle, self.generator = load_generator(pretrained, weights, dtype=dtype)
        self.tokenizer_ = load_tokenizer(self.bundle.tokenizer)
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        require(self._batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        model_length = self.generator.config.max_seq_len
        self._max_length = int(max_length) if max_length else model_length
        require(self._max_length <= model_length,
                f"max_length={max_length} exceeds the model's max_seq_len={model_length}")
        self._score = _token_scorer(self.generator)

    # Tokens (lm-eval calls these).

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer_.eod_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> list[int]:
        # Our tokenizers add no special tokens of their own (documents are joined by EOD).
        return [int(t) for t in self.tokenizer_.encode(string)]

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer_.decode(tokens)

    # Scoring.

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per (key, context, cont)."""
        rows, spans = [], []
        for _, context, continuation in requests:
            require(len(context) > 0 and len(continuation) > 0,
                    "every lm-eval request needs a context token and a continuation token")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append(whole)
            spans.append(len(continuation))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths batch
        results: list[Optional[tuple[float, bool]]] = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm,
                          desc="bitnet loglikelihood"):
            batch = order[start:start + self.batch_size]
            length = bucket_length(max(len(rows[i]) - 1 for i in batch), self.max_length)
            inputs, targets = right_padded([rows[i] for i in batch], length, self.batch_size)
            logprob_BxT, greedy_BxT = jax.device_get(
                self._score(self.generator.params, jnp.asarray(inputs), jnp.asarray(targets)))
            for row, i in enumerate(batch):
                end = len(rows[i]) - 1
                begin = end - spans[i]
                results[i] = (float(logprob_BxT[row, begin:end].sum(dtype=np.float64)),
                              bool(greedy_BxT[row, begin:end].all()))
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length tokens, each after
        the previous tokens (lm-eval's own windows, as its `hf` model uses them)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # Generation.

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations cut at the first of each request's `until`
        strings, batched by identical generation settings."""
        outputs: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until, max_new, sampling = self._generation_settings(settings)
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])
                       [-(self.max_length - max_new):] for i in indices}
            ordered = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in tqdm(range(0, len(ordered), self.batch_size), disable=disable_tqdm,
                              desc="bitnet generate_until"):
                batch = ordered[start:start + self.batch_size]
                result = generate(self.generator, [prompts[i] for i in batch], max_new,
                                  sampling, stop_id=self.eot_token_id)
                for i, tokens in zip(batch, result.tokens):
                    outputs[i] = _cut(self.tok_decode(tokens), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs

    def _generation_settings(self, settings: dict) -> tuple[list[str], int, SamplingConfig]:
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(settings.pop("max_gen_toks", 256))
        require(0 < max_new < self.max_length,
                f"max_gen_toks={max_new} leaves no room for a prompt in max_length="
                f"{self.max_length}")
        sample = settings.pop("do_sample", False)
        temperature = float(settings.pop("temperature", 0.0)) if sample else 0.0
        top_k, top_p = settings.pop("top_k", None), settings.pop("top_p", None)
        return until, max_new, SamplingConfig(temperature, top_k if sample else None,
                                              top_p if sample else None)


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of each stop string, as lm-eval's hf model cuts it."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# ----------------------------------------------------------------------------------------------
# Running tasks.

def evaluate(model_dir: str | Path, tasks: Sequence[str], include_path: Optional[str] = None,
             limit: Optional[float] = None, batch_size: int = 8, num_fewshot: Optional[int] = None,
             weights: str = "auto", dtype: str = "float32", log_samples: bool = False) -> dict:
    """lm-eval's results for `tasks` (registry names, or names of YAML tasks in
    `include_path`) scored by the model in `model_dir`."""
    from lm_eval import simple_evaluate

    task_manager = task_manager_for(tasks, include_path)
    model = BitnetLM(str(model_dir), batch_size, weights, dtype)
    return simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot,
                           limit=limit, task_manager=task_manager, log_samples=log_samples,
                           bootstrap_iters=0)


def score_run(run_dir: str | Path, spec) -> Path:
    """Score a run on a sweep's tasks (a `scaling.downstream.EvalSpec`) and write its
    lm_eval.json: the spec, then what `results_json` holds. Returns the file's path."""
    results = evaluate(run_dir, spec.tasks, spec.include_path, spec.limit, spec.batch_size,
                       spec.num_fewshot)
    path = Path(run_dir) / run_files.LM_EVAL_FILE
    write_text_atomic(path, json.dumps({"spec": spec.to_json(),
                                        **json.loads(results_json(results))}, indent=2))
    return path


def task_manager_for(tasks: Sequence[str], include_path: Optional[str] = None):
    """lm-eval's TaskManager that knows `tasks`: the YAML files in `include_path` alone when
    they hold every task (indexing lm-eval's own thousands of task files takes ~15 s on a
    2-core machine), else those and lm-eval's registry."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    task_manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    require(not unknown, f"unknown lm-eval task(s) {unknown}: check the names with "
                         f"`lm-eval ls tasks`, or pass --include-path DIR with their YAML files")
    return task_manager


def results_json(results: dict) -> str:
    """The scores, sample counts and task versions of `evaluate`'s results as JSON."""
    keys = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
    return json.dumps({k: results[k] for k in keys if k in results}, indent=2,
                      default=lm_utils.handle_non_serializable)


def format_results(results: dict) -> str:
    """lm-eval's own markdown table (and its group table, if any)."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table
