"""lm-evaluation-harness: our adapter scores the shipped local tasks (tests/lm_eval_tasks: multiple
choice, a perplexity task, short generations) as lm-eval's own `hf` model scores our HF export of
the same trained model; `bitnet eval` runs end to end; nothing is downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

# Local tasks only: datasets and the hub must not reach for the network (set before they load).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from bitnet_jax import cli
from bitnet_jax.config import load_config
from bitnet_jax.data.corpus import load_corpus
from bitnet_jax.data.tokenizers import BPE_SPECIAL_TOKEN, train_bpe
from bitnet_jax.interop import hf
from bitnet_jax.interop import lm_eval_adapter as adapter
from bitnet_jax.interop.packed import save_packed
from bitnet_jax.interop.run_dir import load_run
from bitnet_jax.train.loop import train

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "lm_eval_tasks"
TASKS = ["bitnet_tiny_choice", "bitnet_tiny_text", "bitnet_tiny_gen"]
TINY = {"vocab_size": 320, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "d_ff": 160, "max_seq_len": 64, "dtype": "float32"}


@pytest.fixture(autouse=True)
def offline_from_the_repository_root(monkeypatch):
    """The tasks' data_files are relative to the repository root; datasets stays offline even
    if another test module imported it before the environment was set."""
    import datasets

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


# ----------------------------------------------------------------------------------------------
# Pure helpers.

def test_bucket_lengths_are_powers_of_two_up_to_the_cap():
    assert [adapter.bucket_length(n, 64) for n in (1, 16, 17, 33, 63, 64)] == \
        [16, 16, 32, 64, 64, 64]
    assert adapter.bucket_length(70, 100) == 100
    with pytest.raises(Exception, match="does not fit max_length=64"):
        adapter.bucket_length(65, 64)


def test_right_padded_rows_hold_inputs_and_next_token_targets():
    inputs, targets = adapter.right_padded([[5, 6, 7], [8, 9]], 4, 3)
    np.testing.assert_array_equal(inputs, [[5, 6, 0, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(targets, [[6, 7, 0, 0], [9, 0, 0, 0], [0, 0, 0, 0]])


def test_generations_are_cut_at_the_first_stop_string():
    assert adapter._cut(" blue\nQuestion: x", ["\n", "Question:"]) == " blue"
    assert adapter._cut(" red Question:", ["\n", "Question:"]) == " red "
    assert adapter._cut("as is", ["", "zzz"]) == "as is"


# ----------------------------------------------------------------------------------------------
# One small trained model: a run, its HF export and its packed checkpoint.

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    """A b1.58 model with a byte-level BPE tokenizer, trained a few steps, in three forms."""
    out = tmp_path_factory.mktemp("lm_eval")
    base = {"model": {"preset": None, "overrides": TINY}}
    overrides = [f"out_dir={out}", "name=run", "precision=b1.58", "train.steps=4",
                 "train.batch_size=4", "data.seq_len=32", "data.max_documents=40",
                 "optimizer.warmup_steps=1", "optimizer.lr=1e-2", "train.eval_every=0",
                 "train.eval_batches=1", "train.checkpoint_every=0", "train.progress=false",
                 "train.peak_flops=1e11", "logging.wandb=disabled"]
    tokenizer = train_bpe(load_corpus(load_config(base=base, overrides=overrides).data), 300,
                          out / "bpe.json")
    config = load_config(base=base, overrides=overrides + [f"data.tokenizer={tokenizer}"])
    assert train(config, devices=jax.devices()[:1])["status"] == "completed"
    bundle = load_run(out / "run")
    hf.export_hf(bundle, out / "hf")
    save_packed(bundle, out / "packed", "2bit", "float32")
    return {"run": out / "run", "hf": out / "hf", "packed": out / "packed"}


def by_doc(results: dict, task: str) -> list:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def hf_results(hf_dir: Path, limit) -> dict:
    """lm-eval's own `hf` model on our HF export, float32 on the CPU."""
    torch = pytest.importorskip("torch")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import BitNetForCausalLM, PreTrainedTokenizerFast

    model = BitNetForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"),
                                        eos_token=BPE_SPECIAL_TOKEN)
    # transformers compiles BitNet's quantizers with torch.compile: ~20 s here for the same
    # arithmetic; run them eagerly.
    with torch._dynamo.config.patch(disable=True):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
        return simple_evaluate(model=lm, tasks=TASKS, limit=limit, bootstrap_iters=0,
                               task_manager=TaskManager(include_path=str(TASKS_DIR),
                                                         include_defaults=False))


@pytest.mark.slow
def test_adapter_scores_equal_lm_eval_hf_scores_on_the_export(model_dirs):
    limit = 16
    ours = adapter.evaluate(model_dirs["run"], TASKS, str(TASKS_DIR), limit=limit,
                            log_samples=True)
    theirs = hf_results(model_dirs["hf"], limit)

    # Both run float32 on the same quantized weights. Most sums agree to float32 rounding
    # (~1e-5 on sums of ~-280 over ~60 tokens); one text's sum moved by 7e-4 here, the same with
    # float and int8 weights: a discrete jump, as when XLA's and torch's summation orders round
    # an 8-bit activation on a rounding tie to neighbouring codes. A wrong token, window, pad or
    # shift moves a sum by > 0.1.
    atol = 5e-3
    choice_ours, choice_theirs = by_doc(ours, TASKS[0]), by_doc(theirs, TASKS[0])
    text_ours, text_theirs = by_doc(ours, TASKS[1]), by_doc(theirs, TASKS[1])
    assert len(choice_ours) == len(choice_theirs) == len(text_ours) == limit
    for a, b in zip(choice_ours + text_ours, choice_theirs + text_theirs):
        assert a["arguments"] == b["arguments"]
    for a, b in zip(choice_ours, choice_theirs):
        assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]  # is_greedy

    def loglikelihoods(choice_samples, text_samples):  # (ll, is_greedy) per choice; ll per text
        return np.array([r[0][0] for s in choice_samples for r in s["resps"]]
                        + [s["resps"][0][0] for s in text_samples])

    ll_ours = loglikelihoods(choice_ours, text_ours)
    ll_theirs = loglikelihoods(choice_theirs, text_theirs)
    difference = float(np.abs(ll_ours - ll_theirs).max())
    print(f"largest log-likelihood difference: {difference:.2e}", file=sys.stderr)
    assert difference < atol, difference
    assert float(np.median(np.abs(ll_ours - ll_theirs))) < 1e-4
    gen_ours, gen_theirs = by_doc(ours, TASKS[2]), by_doc(theirs, TASKS[2])
    assert [s["resps"][0][0] for s in gen_ours] == [s["resps"][0][0] for s in gen_theirs]

    # The task scores: accuracies equal exactly (no two choices are within atol here),
    # perplexities to the relative error the log-likelihood tolerance allows.
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][TASKS[0]][metric] == theirs["results"][TASKS[0]][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours["results"][TASKS[1]][metric],
                                   theirs["results"][TASKS[1]][metric], rtol=1e-3)
    assert ours["results"][TASKS[2]]["exact_match,none"] == \
        theirs["results"][TASKS[2]]["exact_match,none"]
    assert 1 < ours["results"][TASKS[1]]["word_perplexity,none"] < np.inf  # scored


@pytest.mark.slow
def test_run_hf_and_packed_directories_score_the_same(model_dirs):
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, ("Question: What do bees make?\nAnswer:", c), 0)
                for c in (" milk", " honey", " bread")]
    requests.append(Instance("loglikelihood", {}, ("", "The cat sat on the mat."), 0))
    scores = {kind: adapter.BitnetLM(str(path), batch_size=2).loglikelihood(requests)
              for kind, path in model_dirs.items()}
    for kind in ("hf", "packed"):
        np.testing.assert_allclose([s[0] for s in scores[kind]], [s[0] for s in scores["run"]],
                                   atol=1e-4, rtol=0)
    assert all(s[0] < 0 for s in scores["run"])


@pytest.mark.slow
def test_bitnet_eval_command_prints_scores(model_dirs):
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    done = subprocess.run(
        [sys.executable, "-m", "bitnet_jax.cli", "eval", str(model_dirs["run"]), "--tasks",
         "bitnet_tiny_choice,bitnet_tiny_text", "--include-path", str(TASKS_DIR), "--limit", "4",
         "--batch-size", "4", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    assert 0 <= results["bitnet_tiny_choice"]["acc,none"] <= 1
    assert results["bitnet_tiny_text"]["bits_per_byte,none"] > 0


@pytest.mark.slow  # lm-eval indexes its own thousands of task files first (~20 s here)
def test_bitnet_eval_refuses_unknown_tasks_in_one_line(tmp_path, capsys):
    code = cli.main(["eval", str(tmp_path), "--tasks", "no_such_task_anywhere",
                     "--include-path", str(TASKS_DIR)])
    assert code == cli.EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: unknown lm-eval task(s) ['no_such_task_anywhere']")
    assert "\n" not in error


def test_bitnet_eval_without_lm_eval_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import bitnet_jax.interop

    monkeypatch.setitem(sys.modules, "bitnet_jax.interop.lm_eval_adapter", None)  # as if lm-eval
    monkeypatch.delattr(bitnet_jax.interop, "lm_eval_adapter")  # were not installed
    assert cli.main(["eval", str(tmp_path), "--tasks", "x"]) == cli.EXIT_USAGE
    assert "pip install 'bitnet-jax[eval]'" in capsys.readouterr().err
