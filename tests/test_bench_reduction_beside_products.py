"""`scripts/bench_reduction_beside_products.py`: its programs compute the same chain, so that
their times compare like with like, and a run writes every program's ratio."""

import json

import jax
import numpy as np
import pytest


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("bench_reduction_beside_products")  # it puts scripts/ on sys.path


def test_the_scaled_programs_compute_the_same_chain(probe):
    programs = probe.programs(layers=3, tokens=16, width=8)
    outputs = {name: np.asarray(jax.device_get(step(state, args)[1]), np.float32)
               for name, (step, state, args) in programs.items() if name != "the reductions alone"}
    want = outputs["codes, scales given"]
    for name in ("codes, scales constant", "codes, scales reduced beside each product",
                 "codes, scales reduced first"):
        np.testing.assert_array_equal(outputs[name], want)
    assert not np.array_equal(outputs["plain"], want)  # the codes are not the weights


def test_a_run_writes_each_programs_ratio_to_the_plain_chain(probe, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert probe.main(["--layers", "2", "--tokens", "16", "--width", "8", "--rounds", "3",
                       "--out", str(out)]) == 0
    results = {row["program"]: row for row in json.loads(out.read_text())["results"]}
    assert set(results) == {"plain", "codes, scales given", "codes, scales constant",
                            "codes, scales reduced beside each product",
                            "codes, scales reduced first", "the reductions alone"}
    assert results["plain"]["vs_plain"] == 1.0
    assert all(row["low"] <= row["vs_plain"] <= row["high"] for row in results.values())
    assert "wrote" in capsys.readouterr().out
