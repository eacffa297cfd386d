"""`bitnet generate`, `export-hf`, `import-hf` and `pack` end to end on a model trained here:
every way out and back in gives the same greedy text, and training continues from an import."""

from __future__ import annotations

import json

import jax
import pytest

from bitnet_jax.interop import run_dir as artifacts
from bitnet_jax.cli import main
from bitnet_jax.config import load_config
from bitnet_jax.train.loop import train

TINY = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
            max_seq_len=64, ffn_activation="relu2", norm_placement="subln")
COMMON = ["train.batch_size=4", "data.seq_len=32", "data.max_documents=20",
          "optimizer.warmup_steps=1", "optimizer.lr=1e-2", "train.eval_every=0",
          "train.eval_batches=1", "train.checkpoint_every=0", "train.progress=false",
          "train.peak_flops=1e11", "logging.wandb=disabled"]
GENERATE = ["--prompt", "def main(", "--prompt", "import", "--max-new-tokens", "12",
            "--dtype", "float32", "--no-stop"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = {"model": {"preset": None, "overrides": TINY}}
    config = load_config(base=base, overrides=[f"out_dir={out}", "name=run", "precision=b1.58",
                                               "train.steps=4", *COMMON])
    assert train(config, devices=jax.devices()[:1])["status"] == "completed"
    return out / "run"


def generated(capsys, model_dir, *extra) -> list[str]:
    assert main(["generate", str(model_dir), *GENERATE, *extra]) == 0
    out, err = capsys.readouterr()
    assert "decode" in err and "tokens/s" in err
    return out.splitlines()


@pytest.mark.slow
def test_every_way_out_and_back_generates_the_same_text(run_dir, tmp_path, capsys):
    text = generated(capsys, run_dir)
    assert len(text) == 2 and text[0].startswith("def main(") and text[1].startswith("import")
    assert generated(capsys, run_dir, "--weights", "float") == text
    assert generated(capsys, run_dir, "--weights", "packed") == text

    assert main(["export-hf", str(run_dir), str(tmp_path / "hf"), "--packed"]) == 0
    assert "bitlinear" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert generated(capsys, tmp_path / "hf") == text  # an HF directory generates directly

    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    assert "bitnet train --config" in capsys.readouterr().out
    assert generated(capsys, tmp_path / "imported") == text

    for layout in ("2bit", "base3"):
        assert main(["pack", str(run_dir), "--out", str(tmp_path / layout), "--layout",
                     layout]) == 0
        assert "linear" in capsys.readouterr().out
        assert generated(capsys, tmp_path / layout) == text
    # The int8 head on packed weights read straight from the file (a lossy head: text may differ)
    assert main(["generate", str(tmp_path / "2bit"), *GENERATE, "--weights", "packed",
                 "--head", "int8"]) == 0
    out, err = capsys.readouterr()
    assert "packed weights, integer products, int8 head" in err
    assert [line[:6] for line in out.splitlines()] == ["def ma", "import"]


@pytest.mark.slow
def test_training_continues_from_an_imported_model(run_dir, tmp_path, capsys):
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    imported = load_config(tmp_path / "imported" / "config.yaml",
                           [f"out_dir={tmp_path / 'runs'}", "name=continued", "train.steps=2",
                            *COMMON])
    assert imported.init_from == str((tmp_path / "imported").resolve())
    summary = train(imported, devices=jax.devices()[:1])
    assert summary["status"] == "completed"
    start = artifacts.load_run(tmp_path / "imported")
    continued = artifacts.load_run(tmp_path / "runs" / "continued")
    assert continued.config == start.config  # same model, trained on from the imported weights
    first_loss = json.loads((tmp_path / "runs" / "continued" / "metrics.jsonl")
                            .read_text().splitlines()[0])["loss"]
    fresh_loss = 5.77  # ln(320): an untrained model's loss on 320 tokens
    assert first_loss < fresh_loss - 0.2


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a run directory" in capsys.readouterr().err
