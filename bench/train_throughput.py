"""GPU training throughput of the project's full step beside the reference script, in one run.

    python bench/train_throughput.py --anchor PATH/ref_train_bench.py [--batch 8] [--seq 4096]

Project step = the real training engine (kotodama_core.train.engine.train): KotodamaLM proxy-108m with
DD-v1 AttnRes, chunked head + z-loss, hybrid Muon/AdamW, clipping at 1.0, batches from the TokenLoader
over a random-token data artifact, bf16 autocast, torch.compile. Step times come from the engine's own
metrics.jsonl, logged every `--window` steps (the engine synchronizes only when it logs, like the
reference, which synchronizes once around its timed loop); the figure is the median window after the
warm-up windows, so compilation and the checkpoint written at the end are not counted. The reference
runs as a subprocess of the anchor script (`ref_compile`, `attnres_compile`) with the same batch and
length. Prints one JSON line per measurement and a summary with the ratios.

Measurements (--only): ref, project, per_read (AttnRes read source by source, the schedule before the
two-phase one), kernels (phase 1 of the reads with the Triton kernels, train.attn_res_kernels), regions (train.compile_scope
layers: the repeated regions compiled instead of the whole model), graph, regions_graph and
no_attnres_graph (train.cuda_graph: the whole step replayed from one CUDA graph, at the model scope, at
the layers scope, and with AttnRes off), recipe (--accum micro-batches per
optimizer step, as the presets' global batches train on one device), fp8 (train.fp8: torchao float8
matmuls in the hidden layers; carry the torchao wheel), bf16_mix (train.attn_res_mix_dtype activation: the
AttnRes phase-1 mixes stored in bf16), fp32_mix (train.attn_res_mix_dtype float32), no_attnres, attnres_ref, optimizer (hybrid step alone, and its Muon and AdamW parts),
mb16 (micro-batch 16), profile (the project step under torch.profiler: CUDA time by kernel, written to
--profile-out, and the device's busy time against its span), profile_no_attnres (the same with AttnRes off).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rehearsal_headline import steady_tokens_per_s  # noqa: E402
from kotodama_core.artifacts import write_manifest  # noqa: E402
from kotodama_core.config import load_config, parse_overrides  # noqa: E402
from kotodama_core.data.manifest_fields import describe_splits  # noqa: E402
from kotodama_core.data.shards import write_shard  # noqa: E402
from kotodama_core.model import KotodamaLM, compile_forward  # noqa: E402
from kotodama_core.model.attnres import AttnResRuntime  # noqa: E402
from kotodama_core.optim import build_optimizer  # noqa: E402
from kotodama_core.train.distributed import DistInfo  # noqa: E402
from kotodama_core.train import engine  # noqa: E402
from kotodama_core.train.engine import train  # noqa: E402
from kotodama_core.train.step_graph import StepGraph  # noqa: E402
from kotodama_core.train.throughput import model_flops_per_token  # noqa: E402

H100_PEAK = 989e12


def random_data(folder: Path, rows: int, window: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("val", 16)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        write_shard(folder / split / "shard_00000.arrow", rng.integers(0, vocab, (n, window), dtype=np.uint16))
    extra = describe_splits(folder, {s: [folder / s / "shard_00000.arrow"] for s in ("train", "val")},
                            window=window, vocab_size=vocab, eos_id=0)
    write_manifest(folder, stage="bench-random", config={"rows": rows}, inputs={}, extra=extra)
    return folder


def attn_res_overrides(attn_res: bool) -> dict:
    """Config overrides that switch AttnRes on (the preset's boundaries) or off (no boundaries)."""
    return {"model.attn_res": True} if attn_res else {"model.attn_res": False, "model.attn_res_boundaries": None}


def project_step(args, attn_res: bool, batch: int, windows: int, compile_: bool = True,
                 variant: str = "", config: dict | None = None, accum: int = 1, **runtime: bool) -> dict:
    """The engine's step; `windows` timed windows of args.window steps after args.warmup_windows. With
    `accum` > 1 an optimizer step takes `accum` micro-batches (gradient accumulation, as a preset whose
    global batch exceeds one device's micro-batch trains); tokens/s counts every micro-batch."""
    # Step 0 (the compile) logs alone, so one step more makes every later window whole: windows end at
    # steps window, 2·window, ... and the last one at the final step.
    steps = (args.warmup_windows + windows) * args.window + 1
    overrides = {"train.seq_len": args.seq, "train.micro_batch": batch,
                 "train.global_batch_tokens": batch * args.seq * accum, "train.steps": steps,
                 "train.log_every": args.window,
                 "train.compile": compile_, "train.precision": "bf16" if args.device == "cuda" else "fp32", "train.monitor.enabled": False,
                 "train.checkpoint.every_steps": 10**9, "train.val_batches": 1, "schedule.warmup_steps": 2,
                 **attn_res_overrides(attn_res)}
    overrides.update(parse_overrides(args.set))
    overrides.update(config or {})
    cfg = load_config(ROOT / f"configs/presets/{args.preset}.yaml", overrides)
    cuda = args.device == "cuda"
    info = DistInfo(0, 1, 0, torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        data = random_data(Path(tmp) / "data", rows=batch * accum * (steps + 2), window=args.seq + 1,
                           vocab=cfg.model.vocab_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model_class = engine.KotodamaLM
        if runtime:  # the bench's only way in: the engine builds its model from the config
            def with_runtime(model_cfg, attn_res_runtime=AttnResRuntime(), **kw):
                return model_class(model_cfg, attn_res_runtime=dataclasses.replace(attn_res_runtime, **runtime), **kw)
            engine.KotodamaLM = with_runtime
        try:
            train(cfg, data, Path(tmp) / "run", info=info)
        finally:
            engine.KotodamaLM = model_class
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    # A record at step k holds the mean step time since the previous record (steps k−window+1..k);
    # records up to the warm-up's end are skipped.
    timed = [r["step_ms"] for r in records if "step_ms" in r and r["step"] > args.warmup_windows * args.window]
    step_ms = statistics.median(timed)
    tok_s = cfg.train.global_batch_tokens / (step_ms / 1e3)
    mfu = tok_s * model_flops_per_token(cfg.model, args.seq) / H100_PEAK
    name = "project" + ("" if attn_res else "_no_attnres") + variant
    first = next((r for r in records if r.get("step") == 0 and "step_ms" in r), None)
    stalls = [r["checkpoint_stall_s"] for r in records if "checkpoint_stall_s" in r]
    return {"name": name + ("" if compile_ else "_eager"), "B": batch, "accum": accum,
            "windows_ms": [round(t, 1) for t in timed],
            "T": args.seq, "step_ms": round(step_ms, 1), "tok_s": round(tok_s), "mfu": round(mfu, 3),
            "mem_gb": round(peak, 1), "loss": last_loss(records),
            # step 0 holds the compile (its record times the loop's start to its end)
            "compile_s": round(first["step_ms"] / 1e3, 2) if first else None,
            "checkpoint_stall_s": round(max(stalls), 3) if stalls else None,
            # train.cuda_graph: host seconds of the capture (step 1), beside the compile
            "capture_s": next((round(r["cuda_graph_capture_s"], 2) for r in records if "cuda_graph_capture_s" in r),
                              None)}


def last_loss(records: list[dict]) -> float | None:
    return next((r["loss"] for r in reversed(records) if "loss" in r), None)


HEADLINE_KEYS = ("device", "date", "ref_compile_tokens_per_s", "project_tokens_per_s", "ratio_vs_ref_compile",
                 "attnres_cost_fraction", "optimizer_step_ms", "compile_s", "checkpoint_stall_s",
                 "stage_vs_bench_ratio", "variants")
# Measurements of the project step with one option changed, reported beside the default in `variants`.
# A variant's AttnRes cost is against the AttnRes-off run of the same option where one is measured
# (ATTNRES_OFF_OF, None for an AttnRes-off variant itself), else against `no_attnres`.
VARIANT_KEYS = ("bf16_mix", "fp32_mix", "fp8", "regions", "graph", "regions_graph", "no_attnres_graph", "kernels",
                "per_read", "mb16")

ATTNRES_OFF_OF = {"graph": "no_attnres_graph", "no_attnres_graph": None}


def headline(results: dict[str, dict], device: str, date: str, stage_tok_s: float | None = None) -> dict:
    """The latest headline (bench/results.json), null where this run did not measure it:
        ratio_vs_ref_compile  = project tok/s ÷ ref_compile tok/s (same run, same batch and length)
        attnres_cost_fraction = 1 − project tok/s ÷ project-with-AttnRes-off tok/s
        optimizer_step_ms     = median synchronized time of the hybrid optimizer step alone
        compile_s             = the project run's step 0 (compile included), seconds
        checkpoint_stall_s    = the project run's worst checkpoint stall (its final save)
        stage_vs_bench_ratio  = a training stage's steady tok/s (--stage-metrics) ÷ project tok/s
        variants              = per measured VARIANT_KEYS option: its tok/s, its ratio to ref_compile, its
                                AttnRes cost (1 − variant tok/s ÷ AttnRes-off tok/s, ATTNRES_OFF_OF), its
                                step 0 s and, with the CUDA graph, its capture s"""
    ref = results.get("ref", {}).get("tok_s")
    proj = results.get("project", {}).get("tok_s")
    plain = results.get("no_attnres", {}).get("tok_s")
    out = {"device": device, "date": date,
           "ref_compile_tokens_per_s": ref, "project_tokens_per_s": proj,
           "ratio_vs_ref_compile": round(proj / ref, 3) if ref and proj else None,
           "attnres_cost_fraction": round(1 - proj / plain, 3) if proj and plain else None,
           "optimizer_step_ms": results.get("optimizer", {}).get("ms"),
           "compile_s": results.get("project", {}).get("compile_s"),
           "checkpoint_stall_s": results.get("project", {}).get("checkpoint_stall_s"),
           "stage_vs_bench_ratio": round(stage_tok_s / proj, 3) if stage_tok_s and proj else None,
           "variants": {}}
    for key in VARIANT_KEYS:
        tok_s = results.get(key, {}).get("tok_s")
        if tok_s:
            off = plain if key not in ATTNRES_OFF_OF else results.get(ATTNRES_OFF_OF[key], {}).get("tok_s")
            out["variants"][key] = {"tokens_per_s": tok_s,
                                    "ratio_vs_ref_compile": round(tok_s / ref, 3) if ref else None,
                                    "attnres_cost_fraction": round(1 - tok_s / off, 3) if off else None,
                                    "compile_s": results[key].get("compile_s"),
                                    "capture_s": results[key].get("capture_s")}
    assert tuple(out) == HEADLINE_KEYS
    return out


def write_headline(path: Path, record: dict) -> None:
    """Overwrite `path` with the headline (written beside and renamed, so a reader never sees half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _median_ms(fn, device: str, repeats: int = 25, warmup: int = 5, host_only: bool = False) -> float:
    """Median wall time of fn() from launch to completion (synchronized before and after), or with
    host_only until fn returns (the host's share: on CUDA the kernels may still be running)."""
    times = []
    for i in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda" and not host_only:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def optimizer_step_ms(args) -> dict:
    """Median time of the hybrid optimizer step alone on the preset with random gradients (`host_ms`: until
    the call returns, the host's share), of its Muon
    and AdamW halves, of Muon and the hybrid step with Muon's PyTorch element-wise passes instead of the
    fused ones (muon_triton, the default on CUDA) and uncaptured (Muon captures its step in a CUDA graph on one
    device by default), of Muon with each Newton–Schulz variant, and on CUDA: the kernels one step launches
    and the step replayed from a CUDA graph as train.cuda_graph runs it (`graphed_ms`: rates rewritten on
    the device, then one replay; the step's kernels without launch gaps)."""
    from kotodama_core.optim.newton_schulz import VARIANTS

    cfg = load_config(ROOT / f"configs/presets/{args.preset}.yaml")
    model = KotodamaLM(cfg.model).to(args.device)
    opt = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    out = {"name": "hybrid_optimizer_step", "ms": round(_median_ms(opt.step, args.device), 2),
           "host_ms": round(_median_ms(opt.step, args.device, host_only=True), 2)}
    for part, o in opt.optimizers.items():
        out[f"{part}_ms"] = round(_median_ms(o.step, args.device), 2)
    muon = opt.optimizers.get("muon")
    out["muon_matrices"] = sum(len(g["params"]) for g in muon.param_groups) if muon else 0
    if muon:
        out.update(optimizer_floor(muon, opt))
        muon.graph = False  # launched kernel by kernel, beside the captured step (the default on CUDA)
        out["muon_uncaptured_ms"] = round(_median_ms(muon.step, args.device), 2)
        out["hybrid_uncaptured_ms"] = round(_median_ms(opt.step, args.device), 2)
        muon.fused = False  # the PyTorch passes, beside the fused ones
        out["muon_pytorch_passes_ms"] = round(_median_ms(muon.step, args.device), 2)
        out["hybrid_pytorch_passes_ms"] = round(_median_ms(opt.step, args.device), 2)
        muon.fused, muon.graph = None, None
        configured = [g["ns_variant"] for g in muon.param_groups]
        for variant in VARIANTS:
            for g in muon.param_groups:
                g["ns_variant"] = variant
            out[f"muon_{variant}_ms"] = round(_median_ms(muon.step, args.device), 2)
        for g, v in zip(muon.param_groups, configured):
            g["ns_variant"] = v
    if args.device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        if muon:
            muon.graph = False  # kernel by kernel, so the profile names each
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        if muon:
            muon.graph = None
        kernels = device_kernels(prof)
        out["kernels_per_step"] = len(kernels)
        out["kernel_ms_by_family"] = kernel_ms_by_family(kernels)
        out["top_kernels_ms"] = top_kernels_ms(kernels, 10)
        out["graphed_ms"] = round(graphed_step_ms(opt), 2)
    return out


def newton_schulz_flops(rows: int, cols: int, steps: int) -> int:
    """FLOPs of the classic Newton–Schulz iteration on one rows×cols matrix (r = min, c = max side): per
    step A = X·Xᵀ (r²c multiply-adds), A·A (r³), (bA + cA²)·X (r²c); 2 FLOPs per multiply-add."""
    r, c = min(rows, cols), max(rows, cols)
    return 2 * steps * (2 * r * r * c + r ** 3)


def optimizer_floor(muon, opt) -> dict:
    """What the hybrid step cannot go below on this device: the Newton–Schulz FLOPs at the device's bf16
    peak, and the bytes its element-wise passes must move at HBM bandwidth. Bytes per Muon element, fp32
    weights and states: gradient read 4, momentum read and write 8, bf16 Newton–Schulz input write and read
    4, bf16 output write and read 4, weight read and write 8 = 28; per AdamW element: gradient 4, two
    moments read and write 16, weight read and write 8 = 28."""
    from kotodama_core.train.throughput import peak_flops

    flops = sum(newton_schulz_flops(*p.shape, g["ns_steps"]) for g in muon.param_groups for p in g["params"])
    muon_elems = sum(p.numel() for g in muon.param_groups for p in g["params"])
    adam = opt.optimizers.get("adamw")
    adam_elems = sum(p.numel() for g in adam.param_groups for p in g["params"]) if adam else 0
    moved = 28 * muon_elems + 28 * adam_elems
    out = {"ns_gflop": round(flops / 1e9, 3), "elementwise_gb": round(moved / 1e9, 3)}
    device = next(iter(muon.param_groups[0]["params"])).device
    peak = peak_flops(device)
    if peak:
        name = torch.cuda.get_device_name(device)
        bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
        out["ns_floor_ms_at_peak"] = round(flops / peak * 1e3, 2)
        if bandwidth:
            out["elementwise_floor_ms"] = round(moved / bandwidth * 1e3, 2)
    return out


# HBM bandwidth by a part of the device name, bytes/s, from the data sheets.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def top_kernels_ms(kernels: list[tuple[str, float, float]], top: int, steps: int = 1) -> dict[str, float]:
    """The `top` kernels of a trace of `steps` steps by time (ms per step), names cut to 70 characters."""
    by_name: dict[str, float] = {}
    for kernel, start, end in kernels:
        by_name[kernel] = by_name.get(kernel, 0.0) + (end - start) / steps / 1e3
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {k[:70]: round(ms, 2 if steps > 1 else 3) for k, ms in ranked}


def kernel_ms_by_family(kernels: list[tuple[str, float, float]], steps: int = 1) -> dict[str, float]:
    """Kernel time (ms per step) of a trace of `steps` steps, summed by KERNEL_FAMILIES."""
    families: dict[str, float] = {}
    for kernel, start, end in kernels:
        families[kernel_family(kernel)] = families.get(kernel_family(kernel), 0.0) + (end - start) / steps / 1e3
    return {k: round(v, 2 if steps > 1 else 3) for k, v in sorted(families.items(), key=lambda kv: -kv[1])}


def graphed_step_ms(opt) -> float:
    """Median time of the hybrid step as train.cuda_graph runs it inside the step's graph: the rates held
    on the device (HybridOptimizer.hold_lrs_on_device), rewritten by set_lr_multiplier, then the replay
    of the optimizer step captured by the engine's StepGraph (its first two calls, the eager warm-up and
    the capture, fall in _median_ms's warm-up). Leaves `opt` holding its rates on the device."""
    device = opt.param_groups[0]["params"][0].device
    graph = StepGraph(opt, device)
    nothing = torch.zeros(1, device=device)

    def body(_batches):
        opt.step()  # the gradients stay: the bench set them once
        return nothing, nothing

    def step() -> None:
        opt.set_lr_multiplier(0.5)
        graph.run("optimizer", 0, [], body)

    ms = _median_ms(step, "cuda")
    if graph.failed:
        raise RuntimeError(f"the optimizer step's capture failed: {graph.failed}")
    return ms


# Kernel families of the profile summary, first match wins (names as the CUDA profiler reports them).
KERNEL_FAMILIES = (("attnres_kernels", ("_mix_forward", "_mix_backward", "_query_grad", "_merge_norm")),
                   ("muon_kernels", ("_muon_momentum_kernel", "_muon_normalize_kernel", "_muon_apply_kernel")),
                   ("attention", ("flash", "fmha", "cudnn")),
                   ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitK")),
                   ("generated", ("triton_",)),
                   ("foreach", ("multi_tensor", "foreach")))


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, needles in KERNEL_FAMILIES:
        if any(n.lower() in lowered for n in needles):
            return family
    return "other"


def device_busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """Time the device spent running at least one kernel (the union of the [start, end) intervals) and
    the span from the first start to the last end; span − busy is the device's idle time in between."""
    if not intervals:
        return 0.0, 0.0
    ordered = sorted(intervals)
    busy, (run_start, run_end) = 0.0, ordered[0]
    for start, end in ordered[1:]:
        if start > run_end:  # a gap: the run of overlapping kernels before it is closed
            busy += run_end - run_start
            run_start = start
        run_end = max(run_end, end)
    busy += run_end - run_start
    return busy, run_end - ordered[0][0]


def profile_step(args, attn_res: bool = True) -> dict:
    """CUDA time by kernel over a few compiled project steps (model, loss, backward, clip, optimizer),
    built from the same config as the project measurements (so --set applies), and by kernel family;
    also the device's busy time (union of kernel intervals) against its span, whose difference is the
    idle time the host leaves between kernels, and the synchronized wall time of the same loop run
    without the profiler (`bare_step_ms`: no data loader, no logging). With train.cuda_graph set (--set)
    the loop replays the step from the engine's StepGraph (name suffix `_graph`)."""
    from torch.profiler import ProfilerActivity, profile

    overrides = parse_overrides(args.set) if attn_res else {**parse_overrides(args.set), **attn_res_overrides(False)}
    name = "profile" if attn_res else "profile_no_attnres"
    cfg = load_config(ROOT / f"configs/presets/{args.preset}.yaml", overrides)
    model = KotodamaLM(cfg.model, attn_res_runtime=engine.attn_res_runtime(cfg.train)).to(args.device)
    opt = build_optimizer(model, cfg.optim)
    fwd = compile_forward(model, cfg.train.compile_scope)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1))
    # train.cuda_graph (--set train.cuda_graph=true): the loop replays the step from the engine's graph
    graph = StepGraph(opt, torch.device(args.device)) if cfg.train.cuda_graph else None

    def body(batches):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = fwd(batches[0][:, :-1], batches[0][:, 1:])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().reshape(1), norm

    def step():
        if graph is None:
            body([ids.to(args.device, non_blocking=True)])
        else:
            graph.run("profile", 0, [ids], body)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(6):
        step()
    torch.cuda.synchronize()
    bare_ms = (time.perf_counter() - t0) / 6 * 1e3
    # Kernel times and the device's idle time from a device-only trace: tracing the host's operators too
    # slows the host enough to open gaps on the device that an unprofiled step does not have.
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = device_kernels(prof)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof_ops:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof_ops.key_averages().table(sort_by="cuda_time_total", row_limit=80, max_name_column_width=110)
    table_path = Path(args.profile_out) if attn_res else Path(args.profile_out).with_suffix(".no_attnres.txt")
    table_path.write_text(table)
    busy_us, span_us = device_busy_and_span([(start, end) for _, start, end in kernels])
    if graph is not None and graph.failed:
        raise RuntimeError(f"the step graph's capture failed: {graph.failed}")
    return {"name": name + ("_graph" if graph is not None else ""), "bare_step_ms": round(bare_ms, 1),
            "cuda_ms_per_step": round(sum(end - start for _, start, end in kernels) / 3 / 1e3, 1),
            "kernels_per_step": round(len(kernels) / 3),
            "device_busy_ms_per_step": round(busy_us / 3 / 1e3, 1),
            "device_span_ms_per_step": round(span_us / 3 / 1e3, 1),
            "ms_by_family": kernel_ms_by_family(kernels, steps=3),
            "top_kernels_ms": top_kernels_ms(kernels, args.profile_top, steps=3),
            "table": str(table_path)}


def device_kernels(prof) -> list[tuple[str, float, float]]:
    """The kernels of a trace as (name, start µs, end µs). Device-side user annotations (such as
    `Optimizer.step#Muon.step`, which spans the kernels inside it) are left out: summed with the kernels
    they would count those kernels twice."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def reference(args, variant: str, batch: int) -> dict:
    env = {**os.environ, "B": str(batch), "T": str(args.seq)}
    proc = subprocess.run([sys.executable, args.anchor, variant], env=env, capture_output=True, text=True,
                          timeout=args.ref_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return {"name": variant, "error": (proc.stderr or proc.stdout)[-800:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", required=True, help="path to ref_train_bench.py")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--window", type=int, default=4, help="steps per timed window (one sync each)")
    ap.add_argument("--accum", type=int, default=8,
                    help="micro-batches per optimizer step for `recipe` (the card's 2M-token batch is 64 of 8 × 4096 "
                         "on one device)")
    ap.add_argument("--windows", type=int, default=12,
                    help="timed windows per measurement; the median is reported. Windows of one run scatter by "
                         "±1.5 ms around a 100 ms step, as large as the changes measured, and 12 windows cost "
                         "about 4 s more than 3 beside a compile of about 130 s")
    ap.add_argument("--warmup-windows", type=int, default=1)
    ap.add_argument("--profile-out", default="profile.txt")
    ap.add_argument("--profile-top", type=int, default=25, help="kernels listed in the profile summary")
    ap.add_argument("--json-out", default=None,
                    help="write the headline (bench/results.json's keys) to this file, rewritten after every "
                         "measurement so a run stopped at a time limit keeps what it measured")
    ap.add_argument("--jsonl-out", default=None,
                    help="also append each measurement as one JSON line to this file as soon as it is done")
    ap.add_argument("--stage-metrics", default=None,
                    help="a training stage's metrics.jsonl: its steady tokens/s over the project's gives "
                         "stage_vs_bench_ratio")
    ap.add_argument("--stage-skip-steps", type=int, default=10,
                    help="steps of --stage-metrics left out as compile and warm-up")
    ap.add_argument("--ref-timeout", type=int, default=300)
    ap.add_argument("--preset", default="proxy-108m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides for every project measurement, e.g. train.compile_scope=layers")
    ap.add_argument("--only", default="ref,project,per_read,no_attnres,attnres_ref,optimizer,mb16",
                    help="comma list of measurements to run")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"torch": torch.__version__, "device": name}), flush=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device_label = f"{name} (torch {torch.__version__}" + (f", Triton {triton_version})" if triton_version else ")")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    stage_tok_s = (steady_tokens_per_s(Path(args.stage_metrics), args.stage_skip_steps)
                   if args.stage_metrics else None)
    results: dict[str, dict] = {}
    t0 = time.time()
    plan = [("ref", lambda: reference(args, "ref_compile", args.batch)),
            ("project", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile)),
            ("per_read", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                              "_per_read", two_phase=False)),
            ("regions", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                             "_regions", {"train.compile_scope": "layers"})),
            ("graph", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                           "_graph", {"train.cuda_graph": True})),
            ("regions_graph", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                                   "_regions_graph", {"train.compile_scope": "layers",
                                                                      "train.cuda_graph": True})),
            ("no_attnres_graph", lambda: project_step(args, False, args.batch, args.windows, not args.no_compile,
                                                      "_graph", {"train.cuda_graph": True})),
            ("recipe", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                            f"_accum{args.accum}", accum=args.accum)),
            ("kernels", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                             "_kernels", {"train.attn_res_kernels": True})),
            ("fp8", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                         "_fp8", {"train.fp8": True})),
            ("bf16_mix", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                              "_bf16_mix", {"train.attn_res_mix_dtype": "activation"})),
            ("fp32_mix", lambda: project_step(args, True, args.batch, args.windows, not args.no_compile,
                                              "_fp32_mix", {"train.attn_res_mix_dtype": "float32"})),
            ("no_attnres", lambda: project_step(args, False, args.batch, args.windows, not args.no_compile)),
            ("attnres_ref", lambda: reference(args, "attnres_compile", args.batch)),
            ("optimizer", lambda: optimizer_step_ms(args)),
            ("mb16", lambda: project_step(args, True, 16, 1, not args.no_compile)),
            ("profile", lambda: profile_step(args)),
            ("profile_no_attnres", lambda: profile_step(args, attn_res=False))]
    steps = dict(plan)
    unknown = [k for k in args.only.split(",") if k not in steps]
    if unknown:
        raise SystemExit(f"unknown measurement(s) {unknown}; choose from {list(steps)}")
    for key in args.only.split(","):  # in the order given, so the most wanted come first
        fn = steps[key]
        started = time.time()
        try:
            results[key] = fn()
        except Exception as exc:  # one failed measurement must not lose the others
            results[key] = {"name": key, "error": f"{type(exc).__name__}: {exc}"[:800]}
        results[key]["elapsed_s"] = round(time.time() - started)
        line = json.dumps(results[key])
        print(line, flush=True)
        if args.jsonl_out:
            with open(args.jsonl_out, "a") as f:
                f.write(line + "\n")
        if args.json_out:
            write_headline(Path(args.json_out), headline(results, device_label, today, stage_tok_s))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    summary = {"elapsed_s": round(time.time() - t0)}
    ref, proj, plain, per_read, kernels = (results.get(k, {}).get("tok_s") for k in
                                           ("ref", "project", "no_attnres", "per_read", "kernels"))
    if ref and proj:
        summary["project_over_ref_compile"] = round(proj / ref, 3)
    if proj and plain:
        summary["attnres_cost"] = round(1 - proj / plain, 3)
    if proj and per_read:
        summary["two_phase_over_per_read"] = round(proj / per_read, 3)
    if proj and kernels:
        summary["kernels_over_project"] = round(kernels / proj, 3)
    if "attnres_ref" in results and results["attnres_ref"].get("tok_s") and proj:
        summary["project_over_attnres_compile"] = round(proj / results["attnres_ref"]["tok_s"], 3)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
