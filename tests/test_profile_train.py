"""`scripts/profile_train.py`: a step's device time per kernel, from the profiler's trace."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "profile_train.py"


@pytest.fixture(scope="module")
def profile_train(load_script):
    return load_script("profile_train")  # it puts scripts/ on sys.path for bench_train


def _metadata(pid, name):
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def _event(pid, name, dur, ts=0.0, **args):
    return {"ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur, "name": name, "args": args}


def test_on_a_gpu_only_the_device_tracks_count(profile_train):
    # The host's threads also record the launches (with their HLO op): counting them would
    # count each kernel twice.
    trace = {"traceEvents": [
        _metadata(1, "/host:CPU"), _metadata(2, "/device:GPU:0"),
        _event(1, "gemm_fusion_dot.3", 9.0, hlo_module="jit_step"),
        _event(1, "$profiler.py:307 trace", 500.0),
        _event(2, "gemm_fusion_dot_3", 40.0, hlo_module="jit_step"),
        _event(2, "loop_convert_fusion_1", 5.0, 40.0, hlo_module="jit_step"),
        {"ph": "i", "pid": 2, "name": "marker"}]}
    assert profile_train.device_kernels(trace) == [("gemm_fusion_dot_3", 40.0, 0.0),
                                                   ("loop_convert_fusion_1", 5.0, 40.0)]


def test_on_a_cpu_the_ops_are_the_events_that_name_their_module(profile_train):
    trace = [_metadata(1, "/host:CPU"),
             _event(1, "ThunkExecutor::Execute", 300.0),
             _event(1, "ynn_fusion.12", 20.0, 3.0, hlo_module="jit_step", hlo_op="ynn_fusion.12"),
             _event(1, "copy.3", 2.5, 23.0, hlo_module="jit_step", hlo_op="copy.3")]
    assert profile_train.device_kernels(trace) == [("ynn_fusion.12", 20.0, 3.0),
                                                   ("copy.3", 2.5, 23.0)]


def test_alone_is_the_time_no_other_kernel_ran(profile_train):
    kernel = profile_train.Kernel
    # dot [0, 10) alone for 4 us, beside the copy [4, 6) and the fusion [5, 12); the fusion
    # then alone [10, 12); a gap; the reduce [20, 25) alone, and the add starting as it ends.
    kernels = [kernel("dot", 10.0, 0.0), kernel("copy", 2.0, 4.0), kernel("fusion", 7.0, 5.0),
               kernel("reduce", 5.0, 20.0), kernel("add", 1.0, 25.0)]
    alone, span = profile_train.alone_micros(kernels)
    assert alone == {"dot": 4.0, "fusion": 2.0, "reduce": 5.0, "add": 1.0}
    assert span == 26.0
    # One kernel after another, as on a GPU's stream: every kernel alone, all its time.
    serial = [kernel(f"k{i}", 3.0, 3.0 * i) for i in range(4)]
    assert sum(profile_train.alone_micros(serial)[0].values()) == 12.0
    assert profile_train.alone_micros([]) == ({}, 0.0)


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tss_128x128_64x6_2x1_v_bz_NNT", "matmul"),
    ("gemm_fusion_dot_343", "matmul"),
    ("sm90_xmma_gemm_i8i32_i8i32_i32_tn_n_tilesize128x128x128", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*)", "attention"),
    ("loop_convert_fusion_47", "other"), ("input_reduce_fusion", "other"),
    ("ynn_fusion.3", "other")])
def test_kernel_classes_follow_the_gpu_libraries_names(profile_train, name, kind):
    assert profile_train.kernel_class(name) == kind


def test_custom_calls_take_their_targets_name(profile_train):
    hlo = ('  %ffi_call.12 = f32[8,4]{1,0} custom-call(%p0, %p1), '
           'custom_call_target="bitnet_int8_scaled_dot", api_version=API_VERSION_TYPED_FFI\n'
           '  %ynn_fusion.3 = f32[8,4]{1,0} fusion(%p0), kind=kCustom, calls=%fused.3\n'
           '  ROOT %custom-call.2 = bf16[8]{0} custom-call(%p2), custom_call_target="Sharding"\n')
    kernel = profile_train.Kernel
    named = profile_train.named_custom_calls(
        [kernel("ffi_call.12", 5.0, 0.0), kernel("ynn_fusion.3", 2.0, 5.0),
         kernel("custom-call.2", 1.0, 7.0), kernel("copy.1", 1.0, 8.0)], hlo)
    assert [k.name for k in named] == ["bitnet_int8_scaled_dot", "ynn_fusion.3", "Sharding",
                                       "copy.1"]
    assert [k[1:] for k in named] == [(5.0, 0.0), (2.0, 5.0), (1.0, 7.0), (1.0, 8.0)]


def test_families_drop_the_numbering_xla_gives_each_fusion(profile_train):
    assert profile_train.family("loop_convert_fusion_47") == "loop_convert_fusion"
    assert profile_train.family("ynn_fusion.12") == "ynn_fusion"
    assert profile_train.family("Memset 0") == "Memset 0"  # no separator: a name, not a number
    assert profile_train.family("sdpa_kernel0") == "sdpa_kernel0"


def test_per_step_sums_and_the_families_that_differ_most(profile_train):
    kernel = profile_train.Kernel
    # Two steps, one after another; in the second both dots overlap the add.
    base = profile_train.summarize([kernel("gemm_fusion_dot_1", 4000.0, 0.0),
                                    kernel("gemm_fusion_dot_2", 2000.0, 5000.0),
                                    kernel("loop_add_fusion_1", 1000.0, 5500.0)], steps=2)
    quant = profile_train.summarize([kernel("nvjet_a", 5000.0, 0.0),
                                     kernel("loop_add_fusion_1", 1000.0, 5000.0),
                                     kernel("input_reduce_fusion_4", 600.0, 6000.0),
                                     kernel("input_reduce_fusion_5", 400.0, 6600.0)], steps=2)
    assert base["busy_ms"] == pytest.approx(3.5) and base["kernels"] == 1.5
    assert base["class_ms"] == {"matmul": 3.0, "attention": 0.0, "other": 0.5}
    assert base["alone_ms"] == pytest.approx(2.5) and base["span_ms"] == pytest.approx(3.5)
    assert base["family_alone_ms"] == pytest.approx({"gemm_fusion_dot": 2.5})
    assert quant["alone_ms"] == pytest.approx(quant["busy_ms"])  # nothing overlaps
    rows = profile_train.family_differences(quant, base, top=2)
    assert [row[0] for row in rows] == ["gemm_fusion_dot", "nvjet_a"]
    assert rows[0][1:] == pytest.approx((-3.0, -1.0, 0.0, 3.0, 0.0, 2.5))
    reduce_row = profile_train.family_differences(quant, base, top=4)[2]
    assert reduce_row[0] == "input_reduce_fusion"
    assert reduce_row[1:] == pytest.approx((0.5, 1.0, 0.5, 0.0, 0.5, 0.0))


@pytest.mark.slow
def test_modes_whose_steps_faulted_are_named(profile_train):
    # Ops touching fresh pages run slower; the report says which modes that may have hit.
    limit = profile_train.FAULTS_WORTH_A_WARNING
    summaries = {"bf16": {"page_faults_per_step": 0}, "b1.58": {"page_faults_per_step": limit},
                 "a4.8": {"page_faults_per_step": limit + 1}}
    assert profile_train.faulted_modes(summaries) == ["a4.8"]


def test_profiles_two_modes_of_a_step_end_to_end(tmp_path):
    # In a process of its own, as it is run: where libtpu was loaded first (a test's TPU AOT
    # compile), the profiler records no XLA:CPU ops, and the script says so and exits.
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--preset", "ladder-1.6m", "--modes",
                          "bf16,b1.58", "--batch", "2", "--seq-len", "32", "--steps", "1",
                          "--by", "op", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"bf16", "b1.58"}
    for summary in report["modes"].values():
        assert summary["busy_ms"] > 0 and summary["kernels"] > 10
        assert sum(summary["family_ms"].values()) == pytest.approx(summary["busy_ms"])
        assert 0 < summary["alone_ms"] <= summary["busy_ms"]
        assert summary["alone_ms"] <= summary["span_ms"] * 1.001
        assert summary["page_faults_per_step"] >= 0 and summary["system_ms_per_step"] >= 0
        # The same time by model operation: every layer's q projection one name.
        assert sum(summary["op_ms"].values()) == pytest.approx(summary["busy_ms"])
        assert sum(summary["op_alone_ms"].values()) == pytest.approx(summary["alone_ms"])
        assert any("layers_*/self_attn/q_proj/" in op for op in summary["op_ms"])
        assert not any("layers_0" in op for op in summary["op_ms"])
    # b1.58 quantizes: it runs kernel families that the bf16 step does not.
    assert set(report["modes"]["b1.58"]["family_ms"]) - set(report["modes"]["bf16"]["family_ms"])
    assert "b1.58 against bf16: the model operations that differ most" in run.stdout
    # Where our CPU kernels run, they appear by name, not as anonymous custom calls.
    from bitnet_jax.core import cpu_ternary

    if jax.default_backend() == "cpu" and cpu_ternary.available():
        assert "bitnet_ternary_absmean" in report["modes"]["b1.58"]["family_ms"]
        assert "ffi_call" not in report["modes"]["b1.58"]["family_ms"]


def test_model_ops_name_what_the_model_computes_once_for_every_layer(profile_train):
    assert profile_train.model_op(
        "jit(train_step)/while/body/closed_call/jvp(Transformer)/Transformer.logits_from_"
        "embeddings/layers_11/mlp/jit(silu)/mul") == \
        "jvp(Transformer)/layers_*/mlp/jit(silu)/mul"
    assert profile_train.model_op("jit(step)/transpose(jvp(M))/layers_0/q_proj/cond/"
                                  "branch_1_fun/ffi_call") == \
        "transpose(jvp(M))/layers_*/q_proj/ffi_call"
    hlo = ('  %ffi_call.7 = bf16[8,4]{1,0} custom-call(%p0), custom_call_target="bitnet_dot", '
           'metadata={op_name="jit(step)/jvp(M)/layers_0/q_proj/cond/branch_0_fun/ffi_call"}\n'
           '  %ffi_call.9 = bf16[8,4]{1,0} custom-call(%p1), custom_call_target="bitnet_dot", '
           'metadata={op_name="jit(step)/jvp(M)/layers_1/q_proj/cond/branch_0_fun/ffi_call"}\n'
           '  %divide_fusion.2 = f32[8,4]{1,0} fusion(%p0), kind=kLoop, calls=%fused.2, '
           'metadata={op_name="jit(step)/jvp(M)/layers_1/mlp/jit(silu)/div" stack_frame_id=3}\n')
    q_proj = "jvp(M)/layers_*/q_proj/ffi_call [bitnet_dot]"
    silu = "jvp(M)/layers_*/mlp/jit(silu)/div"
    kernel = profile_train.Kernel
    kernels = [kernel("ffi_call.7", 3000.0, 0.0), kernel("divide_fusion.2", 1000.0, 1000.0),
               kernel("ffi_call.9", 2000.0, 4000.0), kernel("copy.4", 500.0, 6000.0)]
    ops = profile_train.model_ops(kernels, hlo)
    assert ops == [q_proj, silu, q_proj, "copy"]
    summary = profile_train.summarize(profile_train.named_custom_calls(kernels, hlo), 1, ops)
    assert summary["op_ms"] == pytest.approx({q_proj: 5.0, silu: 1.0, "copy": 0.5})
    assert summary["op_count"][q_proj] == 2
    # The first call ran beside the division for 1 ms of its 3: 2 + 2 ms alone for the two.
    assert summary["op_alone_ms"] == pytest.approx({q_proj: 4.0, "copy": 0.5})
    assert summary["family_ms"]["bitnet_dot"] == pytest.approx(5.0)  # families as before
    rows = profile_train.family_differences(summary, summary, top=1, by="op")
    assert rows[0][1:3] == (0.0, 0)
