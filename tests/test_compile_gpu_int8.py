"""The integer path's GPU kernel compiled for NVIDIA GPUs on this CPU host, by Triton's own
compiler and NVIDIA's ptxas (`scripts/compile_gpu_int8.py`): before a GPU is lent, the kernel's
Triton IR must compile for Ampere and Hopper and multiply on the int8 tensor cores."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import compile_gpu_int8  # noqa: E402


@pytest.mark.slow
def test_the_kernel_compiles_for_ampere_and_hopper_on_int8_tensor_cores(tmp_path, capsys):
    pytest.importorskip("triton")
    out = tmp_path / "compile.json"
    assert compile_gpu_int8.main(["--presets", "b1.58-700m", "--tilings", "128,128,128,8,3",
                                  "--capabilities", "80", "90", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2  # the preset's three forward shapes, two GPUs
    for row in rows:
        assert not row["problems"] and row["int8_mma"] > 0, row
        assert 0 < row["shared_bytes"] <= compile_gpu_int8.GPUS[row["capability"]][0], row
        assert row["blocks"] == [128, 128, 128], row
        assert row["grid"][0] == 16384 // 128 and row["grid"][1] == row["shape"][2] // 128
    # The default tiling keeps its int32 sums in registers on Hopper (the GPUs this project is
    # lent): no spills there.
    assert all(row["stack_bytes"] == 0 for row in rows if row["capability"] == 90), rows
    assert "6 of 6 compiled with int8 tensor cores" in capsys.readouterr().out


def test_ir_that_does_not_compile_is_a_failed_row(tmp_path):
    pytest.importorskip("triton")
    program = compile_gpu_int8.TritonProgram("module { tt.func @broken( }", 4, 3, (1, 1, 1))
    row = compile_gpu_int8.compile_program(program, 90, tmp_path)
    assert row["error"].startswith("triton: ")
    assert compile_gpu_int8.problems(row) == [row["error"]]


@pytest.mark.slow
def test_a_tiling_over_the_shared_memory_of_a_block_fails_the_run(tmp_path, capsys):
    """Triton compiles a program that takes more shared memory than the GPU gives a block; the
    launch would fail on the GPU, so the run fails here."""
    pytest.importorskip("triton")
    assert compile_gpu_int8.main(["--presets", "spectra-390m", "--tilings", "256,256,128,8,4",
                                  "--capabilities", "80", "--json",
                                  str(tmp_path / "c.json")]) == 1
    assert "of shared memory, over the 163 KB a block may take" in capsys.readouterr().out
    assert compile_gpu_int8.problems({"capability": 90, "shared_bytes": 1024, "int8_mma": 0}) \
        == ["no int8 tensor-core instruction"]


def test_cuobjdump_resources_are_read_from_the_kernel_s_own_block():
    listing = ("Resource usage:\n Common:\n  GLOBAL:0\n Function helper:\n  REG:32 STACK:0 "
               "SHARED:0 LOCAL:0\n Function _product_kernel:\n  REG:165 STACK:8 SHARED:1024 "
               "LOCAL:0 CONSTANT[0]:584\n")
    assert compile_gpu_int8.resource_usage(listing, "_product_kernel") == {
        "REG": 165, "STACK": 8, "SHARED": 1024}
    assert compile_gpu_int8.resource_usage(listing, "missing") is None
    assert compile_gpu_int8.resource_usage(" Function k:\n  REG:9 SHARED:0\n", "k") is None


def test_without_triton_it_exits_2_and_says_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert compile_gpu_int8.main(["--json", "unused.json"]) == 2
    assert "needs Triton's compiler" in capsys.readouterr().err
