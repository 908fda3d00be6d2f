"""What the Triton kernels compile to for an H100/H200 (sm_90), checked without a GPU: no register spills,
and the AttnRes kernels' reads and writes through their pointer tables as 16-byte vectors.

The device ran the phase-1 mixes and their gradients as scalar accesses until the table's addresses were
declared aligned (bench/RESULTS.md, 2026-12-04 fifth session: the largest block's kernels 12-16 % faster
with vectors). bench/kernel_codegen.py compiles the kernels as the launcher specializes them and counts
the PTX accesses by width; it runs in a subprocess without TRITON_INTERPRET, which `make test`'s second
pass sets. Skipped where Triton is not installed (the plain pass, the CPU-only install).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def codegen(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("codegen") / "codegen.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_codegen.py"), "--out", str(out)], env=env,
                   check=True, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {row["kernel"]: row for row in rows}


def test_no_kernel_spills_registers(codegen):
    assert codegen, "no kernel was compiled"
    spilled = {name: row["stack_bytes"] for name, row in codegen.items() if row["stack_bytes"]}
    assert not spilled, f"kernels spilling registers to local memory (bytes): {spilled}"


def test_phase_one_mixes_are_written_as_vectors(codegen):
    """Each read's mix row goes out as 16-byte vectors (a thread's 16 elements of a row: four of them in
    fp32, two in bf16); the only scalar stores are the read's logits and its lse (two per read in the
    compiled loop body, which holds every read when they are unrolled)."""
    from kotodama_core.model import attnres_triton

    forward = {n: r for n, r in codegen.items() if n.startswith("attnres_mix_forward")}
    assert forward and any(name.endswith("bf16 mix") for name in forward)
    for name, row in forward.items():
        reads = int(name.split(" R")[1].split()[0])
        body_reads = reads if reads <= attnres_triton.MIX_FORWARD["unroll_reads"] else 1
        assert row["stores"].get("b32", 0) <= 2 * body_reads, (name, row["stores"])
        vectors_per_row = 2 if name.endswith("bf16 mix") else 4
        assert row["stores"].get("v4.b32", 0) >= vectors_per_row * body_reads, (name, row["stores"])
        assert "b16" not in row["stores"], (name, row["stores"])


def test_phase_one_mix_gradients_are_read_as_vectors(codegen):
    """The backward reads each mix gradient row (twice, one pass each) through the table as vectors; the
    scalar loads left are the logits, lse and coefficients (a scalar gradient read would add 32)."""
    backward = {n: r for n, r in codegen.items() if n.startswith("attnres_mix_backward")}
    assert backward
    for name, row in backward.items():
        assert row["loads"].get("b32", 0) <= 16, (name, row["loads"])
        assert "b16" not in row["loads"], (name, row["loads"])
