"""What Triton makes of the project's kernels for a GPU, without one: registers, spills and the width of
every global memory access, read from the compiled PTX and cubin (Triton's bundled ptxas and cuobjdump).

    python bench/kernel_codegen.py [--arch 90] [--out codegen.jsonl]

Each kernel is compiled as Triton's launcher specializes it at proxy-108m's shapes (32,768 tokens of
width 512; Muon's 512 × 1408 matrices): every pointer argument, and every integer argument divisible by
16, carries the 16-divisibility attribute; an integer equal to 1 becomes a constant. One JSON line per
kernel configuration:
    registers, stack_bytes, shared_bytes   per thread / per block, from `cuobjdump -res-usage`
                                           (stack_bytes > 0 means registers spilled to local memory)
    loads, stores                          global PTX instructions by width, e.g. {"v4.b32": 20, "b32": 1}
A 16-byte vector access of fp32 is v4.b32 (of bf16, v4.b32 too, or v2.b32 for 8 bytes); b32 and b16 are
scalar. A scalar access where a vector one would do costs the device several times the instructions for
the same bytes: the AttnRes kernels read and wrote their mixes that way through the pointer table until
the table's addresses were declared aligned (bench/RESULTS.md, 2026-12-04 fifth session).

Run it without TRITON_INTERPRET=1 (the interpreter swaps the kernels for Python functions); needs Triton,
not a GPU. tests/test_kernel_codegen.py runs it and checks the AttnRes kernels' accesses and spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS, WIDTH = 8 * 4096, 512
MUON_SHAPE = (512, 1408)


def _signature(fn, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, as the launcher would specialize `args`: each value is
    a type string with an integer value for integers, e.g. ("i32", 512), or a tuple of pointer types."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind = args[name]
        if isinstance(kind, tuple) and all(isinstance(k, str) for k in kind):  # a tuple of pointers
            signature[name] = kind
            for j in range(len(kind)):
                attrs[(index, j)] = [["tt.divisibility", 16]]
        elif isinstance(kind, tuple):  # an integer with its value
            dtype, value = kind
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = dtype
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = kind
            if kind.startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def _access_widths(ptx: str, op: str) -> dict[str, int]:
    """Global `op` (ld or st) instructions of the PTX by width: {"v4.b32": n, "b32": n, ...}."""
    return dict(Counter(re.findall(rf"\b{op}\.global(?:\.[a-z]+)*?\.((?:v[248]\.)?[bfsu]\d+)\b", ptx)))


def _resources(cubin: bytes, cuobjdump: Path) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return {"registers": int(found[1]), "stack_bytes": int(found[2]), "shared_bytes": int(found[3])}


def compile_report(name: str, fn, args: dict, constexprs: dict, num_warps: int, num_stages: int | None = None,
                   *, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _signature(fn, args, constexprs)
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, **({} if num_stages is None else {"num_stages": num_stages})})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    ptx = kernel.asm["ptx"]
    return {"kernel": name, "num_warps": num_warps, **_resources(kernel.asm["cubin"], cuobjdump),
            "loads": _access_widths(ptx, "ld"), "stores": _access_widths(ptx, "st")}


def attnres_configs():
    """The AttnRes kernels at proxy-108m's blocks: S completed sources (1–6) and R reads a block."""
    from kotodama_core.model import attnres_triton as at

    n, d = ("i32", TOKENS), ("i32", WIDTH)
    # fp32 mixes at three blocks; bf16 mixes (train.attn_res_mix_dtype: activation) at the largest
    for sources, reads, mix_dtype in ((1, 6, torch.float32), (4, 18, torch.float32), (6, 7, torch.float32),
                                      (4, 18, torch.bfloat16)):
        src = tuple(["*fp32"] * sources)
        tag = f"S{sources} R{reads}" + (" bf16 mix" if mix_dtype == torch.bfloat16 else "")
        # the launch parameters the operators themselves pass (attnres_triton._mix_meta)
        forward = at._mix_meta(sources, reads, WIDTH, mix_dtype, at.MIX_FORWARD["warps"])
        backward = at._mix_meta(sources, reads, WIDTH, mix_dtype, at.MIX_BACKWARD["warps"])
        forward_warps, backward_warps = forward.pop("num_warps"), backward.pop("num_warps")
        yield (f"attnres_mix_forward {tag}", at._mix_forward_kernel,
               {"SRC": src, "GQ": "*fp32", "MIX_TABLE": "*i64", "LOGITS": "*fp32", "LSE": "*fp32", "N": n, "D": d,
                "eps": "fp32"},
               {**forward, "UNROLL": reads <= at.MIX_FORWARD["unroll_reads"], "STAGES": at.MIX_FORWARD["stages"]},
               forward_warps)
        yield (f"attnres_mix_backward {tag}", at._mix_backward_kernel,
               {"SRC": src, "GQ": "*fp32", "LOGITS": "*fp32", "LSE": "*fp32", "GRAD_MIX_TABLE": "*i64",
                "GRAD_LSE": "*fp32", "GRAD_SRC": src, "COEF": "*fp32", "N": n, "D": d, "eps": "fp32"},
               {**backward, "STAGES": at._backward_stages(sources)}, backward_warps)
        yield from query_grad_configs(sources, reads, mix_dtype)
    for mix in ("fp32", "bf16"):
        yield from merge_configs(mix)


def query_grad_configs(sources: int, reads: int, mix_dtype: torch.dtype):
    """The ∂q̃ reduction of a block's backward, as attnres_triton._query_grad launches it for mixes of
    mix_dtype (which set its products' precision)."""
    from kotodama_core.model import attnres_triton as at

    _grid, meta = at._query_grad_launch(sources, reads, TOKENS, WIDTH, mix_dtype)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    tag = f"S{sources} R{reads}" + (" bf16 mix" if mix_dtype == torch.bfloat16 else "")
    yield (f"attnres_query_grad {tag}", at._query_grad_kernel,
           {"SRC": tuple(["*fp32"] * sources), "COEF": "*fp32", "PART": "*fp32", "N": ("i32", TOKENS),
            "D": ("i32", WIDTH)}, meta, warps, stages)


def merge_configs(mix: str):
    """The merge kernels reading an fp32 or bf16 mix (and writing its gradient in the same dtype)."""
    from kotodama_core.model import attnres_triton as at

    n, d = ("i32", TOKENS), ("i32", WIDTH)
    tag = "" if mix == "fp32" else " bf16 mix"
    forward = at._merge_meta(at.MERGE_FORWARD, WIDTH)
    forward_warps = forward.pop("num_warps")
    yield (f"attnres_merge_forward{tag}", at._merge_norm_forward_kernel,
           {"MIX": f"*{mix}", "BASE": "*fp32", "DELTA": "*bf16", "LSE": "*fp32", "GQ": "*fp32", "WN": "*fp32",
            "Y": "*bf16", "P_OUT": "*fp32", "SIG": "*fp32", "INV_P": "*fp32", "RSTD": "*fp32", "N": n, "D": d,
            "read_eps": "fp32", "norm_eps": "fp32"}, {**forward, "HAS_DELTA": True}, forward_warps)
    backward = at._merge_meta(at.MERGE_BACKWARD, WIDTH)
    backward_warps = backward.pop("num_warps")
    tiles = -(-TOKENS // at.MERGE_BACKWARD["rows"])
    yield (f"attnres_merge_backward{tag}", at._merge_norm_backward_kernel,
           {"MIX": f"*{mix}", "P": "*fp32", "GQ": "*fp32", "WN": "*fp32", "GY": "*bf16", "GP_IN": "*fp32",
            "SIG": "*fp32", "INV_P": "*fp32", "RSTD": "*fp32", "GRAD_MIX": f"*{mix}", "GRAD_P": "*fp32",
            "GRAD_DELTA": "*bf16", "GRAD_LSE": "*fp32", "PART_WN": "*fp32", "PART_GQ": "*fp32", "N": n, "D": d},
           {**backward, "TILES_PER_PROGRAM": -(-tiles // at.MERGE_PROGRAMS), "HAS_DELTA": True, "HAS_GRAD_P": True},
           backward_warps)


def muon_configs():
    """Muon's momentum and apply kernels on a wide 512 × 1408 matrix (contiguous strides)."""
    from kotodama_core.optim import muon_triton as mt

    rows, cols = MUON_SHAPE
    ints = {"rows": ("i32", rows), "cols": ("i32", cols)}
    yield ("muon_momentum", mt._muon_momentum_kernel,
           {"GRADS": "*i64", "BUF": "*fp32", "U": "*bf16", "PARTIAL": "*fp32", **ints, "su_n": ("i32", rows * cols),
            "su_r": ("i32", cols), "su_c": ("i32", 1), "mu": "fp32"},
           {"NESTEROV": True, "GRAD_BF16": False, "TILE": mt.TILE}, mt.MOMENTUM_WARPS)
    yield ("muon_apply", mt._muon_apply_kernel,
           {"PARAMS": "*i64", "O": "*bf16", "LR": "*fp32", **ints, "so_n": ("i32", rows * cols),
            "so_r": ("i32", cols), "so_c": ("i32", 1), "weight_decay": "fp32", "scale": "fp32"},
           {"PARAM_BF16": False, "TILE": mt.TILE}, mt.APPLY_WARPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90: H100/H200)")
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_codegen compiles the kernels: run it without TRITON_INTERPRET=1")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("kernel_codegen needs Triton (make setup installs it in .venv/triton-interpreter)")
    rows = [compile_report(*config, arch=args.arch) for config in (*attnres_configs(), *muon_configs())]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
