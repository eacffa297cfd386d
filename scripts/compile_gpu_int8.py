"""Compile the integer path's GPU kernel (`core/gpu_int8.py`) for NVIDIA GPUs, without one.

For each forward shape of the GPU benchmark (`bench_gpu_int8.SHAPES`) and each tiling, it lowers
the kernel for CUDA with JAX as each device's part of a step lowered for a GPU takes it, reads the
Triton IR from the program's `__gpu$xla.gpu.triton` call, and compiles that IR with Triton's own
compiler and NVIDIA's ptxas (both in the `triton` wheel) for each compute capability asked for
(default 8.0, Ampere, and 9.0, Hopper). Each row reports what the compiled program takes (shared
memory, registers, and a stack frame where ptxas spilled registers; cuobjdump reads them from the
cubin) and how many int8 tensor-core instructions it issues: `mma.sync` on Ampere and Ada,
`wgmma` on Hopper, int8 operands and int32 sums. A row that does not compile, takes more shared
memory than a block of that GPU may, or multiplies without the int8 tensor cores fails the run
(exit 1); spills are noted. Prints a table and writes JSON.

    python scripts/compile_gpu_int8.py --json compile_gpu_int8.json
    python scripts/compile_gpu_int8.py --tilings 128,256,64,8,3 --capabilities 90

Why: a GPU is lent to this project for minutes at a time, and the kernel's Triton compile is
where the first GPU run would otherwise find out that a tiling does not fit. What this cannot
say is the speed (`bench_gpu_int8.py`, on the GPU), nor what the GPU machine's own jaxlib, with
its own copy of Triton, does with the same IR. Needs `pip install triton` (in the `test` extra);
exits 2 with a clear line without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp

from bitnet_jax.core import gpu_int8
from bitnet_jax.files import short_error

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_gpu_int8 import DEFAULT_TILINGS, SHAPES, parse_tiling  # noqa: E402  (one home each)

# The GPUs this checks for (compute capability x 10): the most shared memory one block may take
# (CUDA's programming guide, per architecture) and the int8 tensor-core instruction Triton emits.
GPUS = {80: (166912, "mma.sync"), 86: (101376, "mma.sync"), 89: (101376, "mma.sync"),
        90: (232448, "wgmma.mma_async")}
DEFAULT_CAPABILITIES = (80, 90)


@dataclasses.dataclass(frozen=True)
class TritonProgram:
    """One Pallas kernel as XLA's GPU compiler would receive it: Triton IR text and its launch."""

    ir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def triton_programs(fn, *args) -> list[TritonProgram]:
    """The Triton kernels in `fn(*args)` lowered for CUDA on this host: each `pallas_call`'s IR,
    which jaxlib (up to 0.10.2 at least) stores as MLIR bytecode in the custom call's backend
    config, printed as text with jaxlib's own Triton dialect."""
    # jax._src: the Triton dialect and the IR context are not public API; this script is a check
    # on the kernel, not part of the library.
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as triton_dialect

    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    configs = []

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    op = op.operation
                    if (op.name == "stablehlo.custom_call"
                            and ir.StringAttr(op.attributes["call_target_name"]).value
                            == gpu_int8.TRITON_CALL_TARGET):
                        configs.append(op.attributes["mhlo.backend_config"])
                    walk(op)

    walk(module.operation)
    context = mlir.make_ir_context()
    triton_dialect.register_dialect(context)
    programs = []
    for config in configs:
        with context:
            kernel = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
        integer = lambda name: ir.IntegerAttr(config[name]).value  # noqa: E731
        programs.append(TritonProgram(
            kernel.operation.get_asm(enable_debug_info=False), integer("num_warps"),
            integer("num_stages"), (integer("grid_x"), integer("grid_y"), integer("grid_z"))))
    return programs


def kernel_program(m: int, k: int, n: int, tile: gpu_int8.Tiling) -> TritonProgram:
    """The product's Triton program for one device's (m, k) x (k, n) with `tile`, for a shape
    that splits into the tiling's blocks (`gpu_int8.whole_blocks`)."""
    local = functools.partial(gpu_int8._local_product, tile=tile, interpret=False)
    programs = triton_programs(local, jax.ShapeDtypeStruct((m, k), jnp.int8),
                               jax.ShapeDtypeStruct((m,), jnp.float32),
                               jax.ShapeDtypeStruct((n, k), jnp.int8),
                               jax.ShapeDtypeStruct((n,), jnp.float32))
    if len(programs) != 1:
        raise RuntimeError(f"compile_gpu_int8: {len(programs)} `{gpu_int8.TRITON_CALL_TARGET}` "
                           f"calls in the program lowered for CUDA, want 1 (jax "
                           f"{jax.__version__} may lower Pallas another way)")
    return programs[0]


def cuobjdump_path() -> Optional[str]:
    """The cuobjdump that the triton wheel ships beside its ptxas, else one on PATH."""
    import triton

    shipped = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(shipped) if shipped.exists() else shutil.which("cuobjdump")


def int8_mma_instructions(ptx: str, capability: int) -> int:
    """How many int8 x int8 -> int32 tensor-core instructions the PTX issues: `wgmma` on Hopper
    (9.0), `mma.sync` on Ampere and Ada (8.x)."""
    op = re.escape(GPUS[capability][1])
    return len(re.findall(op + r"\.[\w.]*\.s32\.s8\.s8", ptx))


def resource_usage(listing: str, function: str) -> Optional[dict[str, int]]:
    """REG, STACK and SHARED of `function` in `cuobjdump --dump-resource-usage`'s listing (its
    block after `Function <name>:`), or None where the listing lacks one of them."""
    block = re.search(rf"Function {re.escape(function)}:\s*\n(.*)", listing)
    usage = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", block.group(1))) if block else {}
    return ({key: int(usage[key]) for key in ("REG", "STACK", "SHARED")}
            if {"REG", "STACK", "SHARED"} <= usage.keys() else None)


def compile_program(program: TritonProgram, capability: int, workdir: pathlib.Path) -> dict:
    """Triton's compile of `program` for one compute capability (its PTX assembled by the ptxas
    Triton picks), then the cubin's resources as cuobjdump reads them: shared memory,
    registers, the stack frame (where ptxas spilled registers) and int8 MMA instructions;
    `error` where a step failed. Triton compiles in this process: IR that crashes its compiler
    (rather than raising) ends the run."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = workdir / "kernel.ttir"
    path.write_text(program.ir)
    row = {"capability": capability, "num_warps": program.num_warps,
           "num_stages": program.num_stages, "grid": list(program.grid)}
    try:
        # fp fusion said aloud, Triton's default until 3.10 (which warns when it is left
        # unset): the kernel has no a * b + c to contract, its epilogue is two multiplies.
        compiled = triton.compile(str(path), target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": program.num_warps,
                                           "num_stages": program.num_stages,
                                           "enable_fp_fusion": True})
    except Exception as error:  # Triton raises its own types; one line per failed row
        return {**row, "error": f"triton: {short_error(error)}", "error_text": str(error)}
    row["int8_mma"] = int8_mma_instructions(compiled.asm["ptx"], capability)
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = cuobjdump_path()
    if tool is None:
        return {**row, "error": "cuobjdump: not found (the triton wheel ships one)"}
    result = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True,
                            text=True)
    usage = resource_usage(result.stdout, compiled.metadata.name)
    if result.returncode != 0 or usage is None:
        return {**row, "error": f"cuobjdump: {(result.stderr or result.stdout).strip()[:200]}"}
    row.update(registers=usage["REG"], stack_bytes=usage["STACK"],
               shared_bytes=int(compiled.metadata.shared) + usage["SHARED"])
    return row


def problems(row: dict) -> list[str]:
    """Why a row fails the run: no compile, more shared memory than a block of that GPU may
    take (Triton compiles such a program; the launch would fail), or no int8 tensor cores."""
    if "error" in row:
        return [row["error"]]
    found = []
    limit = GPUS[row["capability"]][0]
    if row["shared_bytes"] > limit:
        found.append(f"{row['shared_bytes'] // 1024} KB of shared memory, over the "
                     f"{limit // 1024} KB a block may take")
    if not row["int8_mma"]:
        found.append("no int8 tensor-core instruction")
    return found


def notes(row: dict) -> list[str]:
    """What a passing row should make one look twice at: registers spilled to the stack."""
    return ([f"spills (a {row['stack_bytes']} B stack frame)"] if row.get("stack_bytes")
            else [])


def table_line(row: dict) -> str:
    """One row of the table: the blocks compiled (the tiling's, halved to divide the shape by
    `gpu_int8.whole_blocks`) with the tiling's warps and stages."""
    m, k, n = row["shape"]
    tiling = ",".join(str(v) for v in row["blocks"] + row["tiling"][3:])
    figures = ("" if "error" in row else
               f"{row['shared_bytes'] / 1024:>8.0f} {row['registers']:>5} "
               f"{row['stack_bytes']:>6} {row['int8_mma']:>9}")
    status = "; ".join(row["problems"] or ["ok"] + row["notes"])
    return (f"{row['preset']:<13} {f'{m}x{k}x{n}':<19} {tiling:<18} {row['capability']:>3} "
            f"{figures:<31}  {status}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="b1.58-700m,spectra-390m",
                        help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--tilings", nargs="*", type=parse_tiling,
                        default=[parse_tiling(t) for t in DEFAULT_TILINGS],
                        help="block_m,block_n,block_k,warps,stages")
    parser.add_argument("--capabilities", nargs="*", type=int, default=list(DEFAULT_CAPABILITIES),
                        choices=sorted(GPUS),
                        help="CUDA compute capabilities times 10 (80: A100, 90: H100/H200)")
    parser.add_argument("--json", default="compile_gpu_int8.json")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile_gpu_int8: needs Triton's compiler (`pip install triton`)", file=sys.stderr)
        return 2
    unknown = [p for p in args.presets.split(",") if p not in SHAPES]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {', '.join(SHAPES)}")

    rows = []
    header = (f"{'preset':<13} {'M x K x N':<19} {'tiling':<18} {'cc':>3} {'smem KB':>8} "
              f"{'regs':>5} {'stack':>6} {'int8 mma':>9}  status")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            for m, k, n in SHAPES[preset]:
                for tile in args.tilings:
                    blocks = gpu_int8.whole_blocks(m, n, k, tile)
                    if blocks is None:  # XLA's product at this shape: no kernel to build
                        continue
                    program = kernel_program(m, k, n, tile)
                    for capability in args.capabilities:
                        row = {"preset": preset, "shape": [m, k, n], "tiling": list(tile),
                               "blocks": list(blocks),
                               **compile_program(program, capability, pathlib.Path(tmp))}
                        row["problems"], row["notes"] = problems(row), notes(row)
                        rows.append(row)
                        print(table_line(row), flush=True)
    pathlib.Path(args.json).write_text(json.dumps(
        {"jax": jax.__version__, "triton": sys.modules["triton"].__version__, "rows": rows},
        indent=1))
    failed = sum(bool(row["problems"]) for row in rows)
    spilled = sum(bool(row["notes"]) for row in rows)
    print(f"{len(rows) - failed} of {len(rows)} compiled with int8 tensor cores ({spilled} "
          f"spilling registers); wrote {args.json}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
