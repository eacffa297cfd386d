"""Plan before you spend: train steps compiled ahead of time, memory per device, `sweep plan --compile`."""

import importlib.util
import json

import jax
import pytest
import yaml

from bitnet_jax.cli import main
from bitnet_jax.core import cpu_int8
from bitnet_jax.config import RunConfig, from_dict
from bitnet_jax.errors import ConfigError
from bitnet_jax.train import aot

TINY = {
    "model": {"preset": "ladder-50k"},
    "data": {"source": "builtin", "seq_len": 32},
    "train": {"batch_size": 8, "steps": 10},
    "optimizer": {"warmup_steps": 2},
    "logging": {"wandb": "disabled"},
}
KEYS = {"run", "preset", "precision", "topology", "devices", "bytes_per_device", "device_bytes",
        "fits", "flops_compiled", "flops_analytic", "compile_s"}
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def tiny(**mesh) -> RunConfig:
    return from_dict(RunConfig, {**TINY, "mesh": {"data": 1, "fsdp": -1, "tensor": 1, **mesh}})


def write_sweep(tmp_path, **base_extra):
    spec = {"name": "tiny", "out_dir": str(tmp_path / "runs"), "base": {**TINY, **base_extra},
            "axes": [{"precision": ["bf16", "b1.58"]}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_local_compile_reports_memory_and_flops_without_data_or_allocation(tmp_path):
    step = aot.compile_train_step(tiny(), jax.devices()[:8])
    assert step.devices == 8 and step.fits and step.error is None
    assert 0 < step.argument_bytes < step.total_bytes <= step.device_bytes
    assert step.temporary_bytes > 0 and step.compile_seconds > 0
    assert step.flops_per_device > 0


def test_fsdp_divides_the_state_bytes_per_device():
    one = aot.compile_train_step(tiny(), jax.devices()[:1])
    eight = aot.compile_train_step(tiny(), jax.devices()[:8])
    # Parameters and Adam moments are split 8 ways (small replicated leaves aside).
    assert eight.argument_bytes < one.argument_bytes / 4


def test_out_of_memory_message_still_gives_the_temporaries():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (71.18G) exceeds available HBM (15.75G).")
    assert aot._out_of_memory_temporaries(message) == int(71.18 * (1 << 30))
    assert aot._out_of_memory_temporaries("INTERNAL: something else") is None


def test_device_memory_table_and_local_fallback():
    class Fake:
        device_kind = "TPU v5 lite"

    assert aot.device_memory_bytes(Fake()) == 16 * aot.GIB
    assert aot.device_memory_bytes(jax.devices()[0]) > 0  # CPU: host RAM


def test_sweep_plan_compile_json_has_the_documented_keys(tmp_path, capsys):
    path = write_sweep(tmp_path)
    assert main(["sweep", "plan", str(path), "--compile", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(KEYS <= set(row) for row in rows)
    assert {row["precision"] for row in rows} == {"bf16", "b1.58"}
    for row in rows:
        assert row["fits"] and row["devices"] == jax.device_count()
        # The compiled step does the analytic matmuls plus elementwise work (norms, Adam,
        # quantizers): same order of magnitude, never far below; except that XLA's count leaves
        # out the products our CPU kernels take as custom calls (on this local CPU the quantized
        # step's, where the kernels run: `compile_plan`'s docstring).
        lower = 0.8 if row["precision"] == "bf16" or not cpu_int8.available() else 0.2
        assert lower * row["flops_analytic"] < row["flops_compiled"] < 4 * row["flops_analytic"]
    assert not (tmp_path / "runs").exists()  # planning runs nothing


def test_sweep_plan_table_marks_runs_that_do_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aot, "device_memory_bytes", lambda device: 1 << 10)
    path = write_sweep(tmp_path)
    assert main(["sweep", "plan", str(path), "--compile"]) == 0
    out = capsys.readouterr().out
    assert " NO " in out and "2 of 2 runs do NOT fit" in out
    assert "try model.scan_layers=true, model.remat=full, a larger train.grad_accum" in out


def test_plan_suggests_only_what_the_runs_do_not_already_use():
    from bitnet_jax.scaling.compile_plan import _remedies

    both = [{"scan_layers": True, "remat": "full"}]
    assert _remedies(both) == "a larger train.grad_accum, more devices"
    assert _remedies(both + [{"scan_layers": True, "remat": "none"}]).startswith(
        "model.remat=full, a larger")


def test_topology_without_compile_or_libtpu_is_one_clear_error(tmp_path):
    path = write_sweep(tmp_path)
    assert main(["sweep", "plan", str(path), "--topology", "v5e:2x2"]) == 2
    if not HAS_LIBTPU:
        with pytest.raises(ConfigError, match="pip install -e '.\\[tpu\\]'"):
            aot.topology_devices("v5e:2x2")
    with pytest.raises(ConfigError, match="v5e:16x16"):
        aot.topology_devices("v9z:1x1")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_compile_for_a_tpu_topology_on_this_machine(tmp_path, capsys):
    path = write_sweep(tmp_path, mesh={"data": 1, "fsdp": -1, "tensor": 1})
    assert main(["sweep", "plan", str(path), "--compile", "--topology", "v5e:2x2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["devices"] for row in rows] == [4, 4]
    assert all(row["device_bytes"] == 16 * aot.GIB and row["fits"] for row in rows)
    assert all(row["topology"] == "v5e:2x2" for row in rows)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_the_integer_path_compiles_for_a_tpu_on_this_machine(tmp_path, capsys):
    """Our int8 kernels are CPU custom calls: compiled for a TPU from this CPU host, the integer
    path (int8 input gradient included) must lower XLA's products instead (it failed with
    "Custom emitter ... not found" before they became `platform_dependent`)."""
    base = {**TINY, "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "train": {**TINY["train"], "integer_forward": True, "int8_backward": True}}
    spec = {"name": "tiny", "out_dir": str(tmp_path / "runs"), "base": base,
            "axes": [{"precision": ["b1.58"]}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", "plan", str(path), "--compile", "--topology", "v5e:2x2", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["fits"] and row["flops_compiled"] > 0


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_a_run_over_tpu_memory_is_marked_with_its_bytes():
    # A tiny model with a huge vocabulary: the float32 logits alone are 17 GiB per device.
    config = from_dict(RunConfig, {**TINY, "model": {"preset": "ladder-50k",
                                                     "overrides": {"vocab_size": 131072,
                                                                   "max_seq_len": 2048}},
                                   "data": {"source": "builtin", "seq_len": 2048},
                                   "train": {"batch_size": 64, "steps": 10}})
    step = aot.compile_train_step(config, aot.topology_devices("v5e:2x2"))
    assert not step.fits and step.total_bytes > 16 * aot.GIB
    assert step.argument_bytes > 0 and "memory" in step.error
