"""Tests for the `bitnet` command: `info` as a table and as JSON, `--list`, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_jax.cli import main
from bitnet_jax.units import format_bytes, format_count, format_energy

REPO = Path(__file__).resolve().parents[1]


def test_info_json(capsys):
    code = main(["info", "--model", "ladder-1.6m", "--precision", "b1.58", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["model"] == "ladder-1.6m"
    assert {"config", "precision", "seq_len", "params", "flops_per_token", "energy_per_token",
            "memory"} <= set(summary)
    assert summary["precision"]["name"] == "b1.58"
    assert summary["seq_len"] == 256  # the preset's max_seq_len
    assert set(summary["flops_per_token"]) == {"kaplan", "full", "causal"}
    assert summary["params"]["total"] == 1_694_400
    assert summary["memory"]["default_format"] == "2bit"


def test_info_seq_len(capsys):
    assert main(["info", "--model", "ladder-1.6m", "--seq-len", "64", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seq_len"] == 64
    assert summary["energy_per_token"]["7nm"]["context_len"] == 64


def test_info_table(capsys):
    assert main(["info", "--model", "bitnet-2b4t", "--precision", "b1.58"]) == 0
    out = capsys.readouterr().out
    assert "bitnet-2b4t" in out and "b1.58" in out
    assert "2.41B" in out and "2,412,820,480" in out  # total parameters
    for word in ("kaplan", "full", "causal", "45nm", "7nm", "2bit", "base3", "x bf16"):
        assert word in out
    assert "71.4x at 7nm" in out


def test_info_list(capsys):
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("ladder-50k", "bitnet-2b4t", "spectra-3.9b", "b1.58-700m", "bf16", "a4.8"):
        assert name in out


@pytest.mark.parametrize("argv,needle", [
    (["info", "--model", "no-such-model"], "unknown model preset 'no-such-model'; valid: "),
    (["info", "--model", "ladder-50k", "--precision", "b3"], "unknown precision recipe 'b3'"),
    (["info", "--model", "ladder-50k", "--seq-len", "0"], "seq_len must be a positive integer"),
    (["info"], "info needs --model"),
])
def test_errors_are_one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert "Traceback" not in err
    if "model preset" in needle:
        assert "ladder-50k" in err and "bitnet-2b4t" in err  # lists the valid names


@pytest.mark.parametrize("override,needle", [
    ("precision=b1.59", "unknown precision recipe 'b1.59'"),
    ("model.d_modle=64", "did you mean 'd_model'"),
    ("data.seq_len=4096", "exceeds the model's max_seq_len"),
])
def test_train_refuses_a_bad_config_before_any_compute(capsys, tmp_path, override, needle):
    assert main(["train", f"out_dir={tmp_path}", "logging.wandb=disabled", override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert list(tmp_path.iterdir()) == []  # no run directory was started


def test_tokenizer_train_writes_a_tokenizer_that_loads(capsys, tmp_path):
    from bitnet_jax.data.tokenizers import load_tokenizer

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(out),
                 "data.max_documents=8"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'tokenizer.json'}"
    assert load_tokenizer(str(out)).vocab_size == 300


def test_argparse_errors_return_2(capsys):
    assert main([]) == 2
    assert main(["info", "--seq-len", "many"]) == 2
    assert "usage: bitnet" in capsys.readouterr().err


def test_formatting():
    assert format_count(40_960) == "41.0K"
    assert format_count(1_694_400) == "1.69M"
    assert format_count(328_335_360) == "328M"
    assert format_count(2_412_820_480) == "2.41B"
    assert format_energy(512.0) == "512 pJ"
    assert format_energy(1.5e9) == "1.5 mJ"
    assert format_bytes(521_011_200) == "521 MB"
    assert format_bytes(4.8e9) == "4.8 GB"


def test_module_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "bitnet_jax.cli", "info", "--model", "ladder-50k",
         "--precision", "bf16"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ladder-50k" in result.stdout and "bf16" in result.stdout
    assert "88.5K" in result.stdout  # total parameters of ladder-50k

    bad = subprocess.run(
        [sys.executable, "-m", "bitnet_jax.cli", "info", "--model", "nope"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown model preset") and "Traceback" not in bad.stderr
