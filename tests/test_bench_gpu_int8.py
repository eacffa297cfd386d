"""scripts/bench_gpu_int8.py: without a GPU it refuses to time and says why; in Pallas's
interpreter it runs end to end, its table and JSON, every tiling's output XLA's bit for bit."""

import json

import jax
import pytest


def test_without_a_gpu_it_says_so_and_exits_non_zero(load_script, tmp_path, capsys):
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the benchmark runs")
    bench = load_script("bench_gpu_int8")
    assert bench.main(["--json", str(tmp_path / "b.json")]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_interpreted_it_writes_its_table_and_json(load_script, tmp_path, capsys):
    bench = load_script("bench_gpu_int8")
    out = tmp_path / "bench.json"
    assert bench.main(["--interpret", "--shapes", "96x256x160", "64x96x64", "--tilings",
                       "64,64,128,4,2", "32,64,32,4,2", "--iters", "1", "--rounds", "2",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["interpret"] is True
    assert [(r["M"], r["K"], r["N"]) for r in report["results"]] == [(96, 256, 160),
                                                                       (64, 96, 64)]
    for row in report["results"]:
        assert row["exact"] == {"64,64,128,4,2": True, "32,64,32,4,2": True}
        assert set(row["median_ms"]) == {"bf16", "xla", "64,64,128,4,2", "32,64,32,4,2"}
        assert all(len(times) == 2 for times in row["rounds_ms"].values())
        assert row["vs_xla"]["xla"] == 1.0
    assert "96x256x160" in capsys.readouterr().out
