"""scripts/bench_weight_gradient.py runs end to end where our backward kernels run (AMX tiles, or
AVX512-BF16 vectors): its table and JSON, with our kernels' outputs (the weight and input
gradients') equal to the paths they replace."""

import json


def test_bench_weight_gradient_writes_its_table_and_json(load_script, bf16_kernels, tmp_path,
                                                          capsys):
    bench = load_script("bench_weight_gradient")
    out = tmp_path / "bench.json"
    bench.main(["--shapes", "64x256x96,40x70x33", "--rounds", "2", "--iters", "2",
                "--warmup", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [row["shape"] for row in report["rows"]] == [[64, 256, 96], [40, 70, 33]]
    for row in report["rows"]:
        assert row["bit_equal"] == {"kernel/xla": True, "fused/before": True, "dx/xla-dx": True}
        assert all(len(times) == 2 and min(times) > 0 for times in row["ms"].values())
    assert set(report["sum_of_medians"]) == {"kernel/xla", "fused/before", "dx/xla-dx"}
    assert "64 x 256 x 96" in capsys.readouterr().out
