"""The training loop: one function driven by a RunConfig, single process or torchrun DDP.

Everything a step depends on (weights, both optimizer states, data position, RNG) is in the checkpoint,
so a run restarted from `step_N` continues exactly as the uninterrupted run would have (bit for bit on
CPU); with weight averaging on, the averaged tensors are in it too. Restarting is automatic: the newest
readable checkpoint in the work folder wins over `init`. Options: weight averaging (`train.averaging`,
written as `model_avg.pt.zst` at the end) and straight-through QAT over the last fraction of the steps
(`train.qat`; the metrics record `qat` = 1 on fake-quantized steps).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kotodama_core.digest import digest
from kotodama_core.data.loader import TokenLoader
from kotodama_core.errors import UserError
from kotodama_core.model import KotodamaLM, compile_forward
from kotodama_core.model.attnres import AttnResRuntime
from kotodama_core.optim import build_optimizer, wsd_lr_multiplier
from kotodama_core.optim.averaging import WeightAverager
from kotodama_core.train import checkpoint as ckpt
from kotodama_core.train.checkpoint_writer import CheckpointWriter, close_quietly
from kotodama_core.train import guard
from kotodama_core.train.budget import TokenBudget, check_budget, token_budget
from kotodama_core.train.distributed import (DistInfo, all_reduce_mean, barrier, gather_objects,
                                             init_distributed)
from kotodama_core.train.init import load_weights_strict, nca_transfer, read_weights, resume_state
from kotodama_core.train.precision import apply_precision
from kotodama_core.train.step_graph import StepGraph, step_graph_unavailable
from kotodama_core.progress import Progress
from kotodama_core.train.throughput import memory_gib, model_flops_per_token, peak_flops

# The run config (kotodama_core.config.RunConfig) sits above the training package, which it imports for
# its `train` section, so the engine names it without importing it.
RunConfig = Any

MetricsSink = Callable[[dict[str, float], int], None]

# Fault injection for tests and drills: the main process SIGKILLs itself right after this step's checkpoint.
FAULT_KILL_ENV = "KOTODAMA_FAULT_KILL_AT_STEP"
AVERAGED_MODEL_FILE = "model_avg.pt.zst"


class TrainingError(UserError, RuntimeError):
    """The run cannot start or go on (data/config mismatch, non-finite loss, ...)."""


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float
    val_loss: float | None
    resumed_from: int | None
    checkpoints: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    averaged_model_file: str | None = None   # relative to the work folder; None without averaging
    val_loss_averaged: float | None = None
    averaging_updates: int = 0
    status: str = "completed"           # completed | completed_after_resume
    budget: TokenBudget | None = None


def _autocast(cfg: RunConfig, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one strict-JSON line (a non-finite value, e.g. an infinite grad norm, is written as null)."""
    from kotodama_core.artifacts import strict_json_value
    with open(path, "a") as f:
        f.write(json.dumps(strict_json_value(record), allow_nan=False) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file. A torn last line (the run was killed mid-write) is dropped with a
    warning; a bad line elsewhere means the file was edited or corrupted, and stops the run by name."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping a torn last line (the run was killed while writing it)",
                              stacklevel=2)
                break
            raise TrainingError(f"{path} line {i + 1} is not JSON ({exc.msg}); repair or remove the file "
                                "to resume") from None
    return records


def _truncate_jsonl(path: Path, before_step: int) -> None:
    """Drop records logged at or after `before_step` (a killed run may have logged past its checkpoint)."""
    if not path.exists():
        return
    kept = [r for r in _read_jsonl(path) if r.get("step", -1) < before_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def last_finite_loss(path: Path) -> float | None:
    """The last finite `loss` logged in a metrics file (None when there is none)."""
    losses = [r["loss"] for r in _read_jsonl(path) if isinstance(r.get("loss"), (int, float))]
    finite = [v for v in losses if math.isfinite(v)]
    return float(finite[-1]) if finite else None


def _loader_for(cfg: RunConfig, data_dir: Path, info: DistInfo) -> TokenLoader:
    loader = TokenLoader(data_dir, split="train", batch_size=cfg.train.micro_batch, rank=info.rank,
                         world_size=info.world_size, seed=cfg.train.seed)
    if loader.window != cfg.train.seq_len + 1:
        raise TrainingError(
            f"data windows hold {loader.window} tokens but train.seq_len={cfg.train.seq_len} needs "
            f"{cfg.train.seq_len + 1}: rebuild the data with seq_len={cfg.train.seq_len} or change train.seq_len")
    return loader


def _read_loss(step: int, reduced: torch.Tensor) -> tuple[float, float]:
    """(loss, ce) of `step` as floats; a non-finite loss stops the run."""
    loss, ce = (float(v) for v in reduced)
    if not math.isfinite(loss):
        raise TrainingError(f"loss is {loss} at step {step}; stopping before the weights are saved")
    return loss, ce


def progress_fields(record: dict[str, Any], val_loss: float | None, device: torch.device) -> dict[str, Any]:
    """The fields of a training progress line, from a metrics record (MFU `n/a` without a known peak)."""
    mfu = record.get("mfu")
    return {"loss": record["loss"], "val loss": val_loss, "lr": record["lr_adamw"], "grad norm": record["grad_norm"],
            "tokens/s": round(record["tokens_per_s"]), "mfu": f"{mfu:.1%}" if mfu is not None else "n/a",
            "mem": f"{memory_gib(device):.2f}GiB"}


def _check_vocab(cfg: RunConfig, data_dir: Path) -> None:
    from kotodama_core.artifacts import read_manifest
    vocab = read_manifest(data_dir).data.get("vocab_size")
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise TrainingError(f"data vocabulary ({vocab}) exceeds model.vocab_size ({cfg.model.vocab_size})")


# Tokens of the train split counted for a count-initialized bigram logit head (the shards are globally
# shuffled, so the first windows are a fair sample).
BIGRAM_COUNT_TOKENS = 50_000_000


def _init_bigram_head(model: KotodamaLM, cfg: RunConfig, data_dir: Path) -> None:
    """Load clip(log p(b|a) − log p(b), ±clip) from train-split counts into the bigram logit head."""
    from kotodama_core.model.techniques.bigram_logits import bigram_log_ratio_table, top_token_ids

    spec = cfg.model.techniques.bigram_logits
    loader = TokenLoader(data_dir, split="train", batch_size=64)
    rows, seen = [], 0
    for batch in loader.iter_eval_batches(64, split="train"):
        rows.append(batch)
        seen += batch.numel()
        if seen >= BIGRAM_COUNT_TOKENS:
            break
    tokens = torch.cat(rows)
    vocab = cfg.model.vocab_size
    support = top_token_ids(tokens, spec.support_tokens, vocab) if spec.support_tokens > 0 else None
    table = bigram_log_ratio_table(tokens, vocab, spec.smoothing, spec.clip, support)
    model.bigram_logits.load_table(table.to(model.embed_tokens.weight.device), support)


def _initial_weights(model: KotodamaLM, cfg: RunConfig, init_path: Path | None, data_dir: Path) -> str:
    mode = cfg.train.init.mode
    if cfg.model.techniques.bigram_logits.enabled:
        _init_bigram_head(model, cfg, data_dir)
    if mode == "scratch":
        return "scratch"
    if init_path is None:
        raise TrainingError(f"train.init.mode={mode!r} needs a checkpoint: set train.init.checkpoint or "
                            "pass an `init` input")
    state = read_weights(init_path)
    if mode == "nca_transfer":
        nca_transfer(model, state, str(init_path), reset_attn_res=cfg.train.init.reset_attn_res)
    else:  # weights, and resume-from-file's weights (its optimizer state is loaded separately)
        load_weights_strict(model, state, str(init_path))
    return f"{mode}:{init_path}"


def _probe_batch(cfg: RunConfig, data_dir: Path) -> torch.Tensor | None:
    mon = cfg.train.monitor
    loader = TokenLoader(data_dir, split="val", batch_size=mon.probe_batch, seed=mon.probe_seed)
    for batch in loader.iter_eval_batches(mon.probe_batch):
        return batch[:, : min(mon.probe_seq_len, batch.shape[1] - 1)]
    return None


@dataclass
class GeometryMonitor:
    """Rank 0's geometry probe: a fixed val batch and the layers to measure (train.monitor)."""

    probe: torch.Tensor
    layers: list[int]

    @classmethod
    def build(cls, cfg: RunConfig, data_dir: Path, info: DistInfo) -> "GeometryMonitor | None":
        if not (cfg.train.monitor.enabled and info.is_main):
            return None
        probe = _probe_batch(cfg, data_dir)
        if probe is None:
            return None
        return cls(probe.to(info.device), [i for i in cfg.train.monitor.layers if i < cfg.model.num_layers])

    def measure(self, model: KotodamaLM) -> dict[str, float]:
        from kotodama_core.train.monitor import monitor_metrics
        return monitor_metrics(model, self.probe, self.layers)


@torch.no_grad()
def evaluate_loss(model: KotodamaLM, data_dir: Path, cfg: RunConfig, device: torch.device,
                  max_batches: int) -> float | None:
    """Mean cross-entropy (nats/token, z-loss excluded) over up to `max_batches` val batches."""
    loader = TokenLoader(data_dir, split="val", batch_size=cfg.train.micro_batch, seed=cfg.train.seed)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with _autocast(cfg, device):
        for i, batch in enumerate(loader.iter_eval_batches(cfg.train.micro_batch)):
            if i >= max_batches:
                break
            batch = batch.to(device)
            _, parts = model(batch[:, :-1], batch[:, 1:])
            total += float(parts["ce"]) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count if count else None


class Stalls:
    """Seconds the training loop spent away from training, per kind (checkpoint, validation, monitor).

    summary(): `<kind>_stall_s_total` = Σ stalls and `<kind>_stall_s_max` = max stall, for each kind seen.
    `on_stall(seconds)` hears of each one (the step-time clock leaves it out)."""

    def __init__(self, on_stall: Callable[[float], None] | None = None) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}
        self.on_stall = on_stall

    def add(self, kind: str, seconds: float) -> None:
        self.seconds.setdefault(kind, []).append(seconds)
        self.last[kind] = seconds
        if self.on_stall is not None:
            self.on_stall(seconds)

    @contextmanager
    def timing(self, kind: str, device: torch.device):
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize()  # the stall includes the GPU work it queued
        self.add(kind, time.perf_counter() - t0)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, values in sorted(self.seconds.items()):
            out[f"{kind}_stall_s_total"] = sum(values)
            out[f"{kind}_stall_s_max"] = max(values)
        return out


@dataclass
class RunState:
    """What a training run starts from: built model, optimizer and loader, positioned at `start_step`."""

    model: KotodamaLM
    optimizer: Any
    loader: TokenLoader
    start_step: int
    tokens_seen: int
    origin: str
    resumed: bool
    averager: WeightAverager | None = None


def _build_averager(model: KotodamaLM, cfg: RunConfig) -> WeightAverager | None:
    a = cfg.train.averaging
    if a.kind == "none":
        return None
    return WeightAverager(model, a.kind, decay=a.decay, swa_every=a.swa_every,
                          swa_lr_threshold=a.swa_lr_threshold)


def default_identity(cfg: RunConfig, data_dir: Path) -> dict[str, Any]:
    """The run identity of the training stage: its config sections and its data input's digest."""
    from kotodama_core.artifacts import read_manifest
    return guard.run_identity({s: cfg.section(s) for s in guard.TRAIN_SECTIONS},
                              {"data": read_manifest(data_dir).digest})


def attn_res_runtime(train_cfg) -> AttnResRuntime:
    """How the AttnRes reads run, from the train section (attn_res_kernels, attn_res_mix_dtype)."""
    return AttnResRuntime(kernels=train_cfg.attn_res_kernels, mix_precision=train_cfg.attn_res_mix_dtype)


def prepare_run(cfg: RunConfig, data_dir: Path, work: Path, info: DistInfo,
                init_path: Path | None = None, identity: dict[str, Any] | None = None) -> RunState:
    """Build model, optimizer and loader; resume from the newest checkpoint in `work`, else apply init.
    A checkpoint in `work` written under another run identity is refused (guard.check_checkpoint)."""
    _check_vocab(cfg, data_dir)
    torch.manual_seed(cfg.train.seed)
    model = KotodamaLM(cfg.model, attn_res_runtime=attn_res_runtime(cfg.train)).to(info.device)
    model = apply_precision(model, cfg.train.precision)  # bf16_pure: the original's whole-model bf16
    loader = _loader_for(cfg, data_dir, info)
    resumed = ckpt.load_latest_checkpoint(work / "checkpoints")
    if resumed is not None and identity is not None:
        guard.check_checkpoint(resumed[1], identity, f"checkpoint {work / 'checkpoints' / ckpt.checkpoint_name(resumed[0])}",
                               work)
    if resumed is None and cfg.train.init.mode == "resume":
        if init_path is None:
            raise TrainingError("train.init.mode='resume' needs a checkpoint: set train.init.checkpoint or "
                                "pass an `init` input")
        state = resume_state(init_path, cfg)  # any checkpoint form, the original's too (train/init.py)
        resumed = (int(state["step"]), state)
    if resumed is None:
        origin = _initial_weights(model, cfg, init_path, data_dir)
        return RunState(model, build_optimizer(model, cfg.optim), loader, 0, 0, origin, False,
                        _build_averager(model, cfg))
    start_step, state = resumed
    if state.get("model_digest", digest(cfg.section("model"))) != digest(cfg.section("model")):
        raise TrainingError(f"checkpoint step {start_step} was written for another model config; "
                            "resume needs the same model section")
    load_weights_strict(model, state["model"], f"checkpoint step {start_step}")
    optimizer = build_optimizer(model, cfg.optim)
    optimizer.load_state_dict(state["optimizer"])
    loaders = state["loader"] or [loader.state_dict()] * info.world_size  # none kept (allow_unmapped): data from its start
    if len(loaders) != info.world_size:
        raise TrainingError(f"checkpoint step {start_step} was written by {len(loaders)} ranks; this run has "
                            f"{info.world_size}: restart with --nproc_per_node {len(loaders)}")
    loader.load_state_dict(loaders[info.rank])
    if state.get("rng"):
        ckpt.set_rng_state(state["rng"][info.rank])
    averager = _build_averager(model, cfg)
    if averager is not None:
        if state.get("averaging") is None:
            warnings.warn(f"checkpoint step {start_step} holds no averaging state; the "
                          f"{averager.kind} average starts from the resumed weights", stacklevel=2)
        else:
            try:
                averager.load_state_dict(state["averaging"])
            except ValueError as exc:
                raise TrainingError(f"checkpoint step {start_step}: {exc}") from None
    return RunState(model, optimizer, loader, start_step, int(state["tokens_seen"]), f"resume:{start_step}", True,
                    averager)


# ----------------------------------------------------------------------------------------------------
# The pieces of `train`, in the order it uses them: set-up, resume (prepare_run above), the step,
# logging, checkpointing, finish.


def _set_up(cfg: RunConfig, data_dir: Path, work: Path, info: DistInfo, identity: dict[str, Any],
            on_metrics: MetricsSink | None) -> TokenBudget:
    """Refuse a run above its token budget, print the budget, and claim `work` for this run identity."""
    from kotodama_core.artifacts import read_manifest

    budget = token_budget(read_manifest(data_dir).data, cfg.train.steps, cfg.train.global_batch_tokens,
                          cfg.train.max_epochs)
    check_budget(budget, str(data_dir))
    if info.is_main:
        print(budget.line(), flush=True)
        guard.claim_work_folder(work, identity)
        if on_metrics:
            on_metrics({"epochs": budget.epochs, "training_tokens": float(budget.training_tokens),
                        "tokens_to_see": float(budget.tokens_to_see)}, 0)
    barrier(info)
    return budget


@dataclass
class Forwards:
    """What a step calls: `wrapped` (the model, or its DDP wrapper, whose no_sync skips gradient
    all-reduces), `plain` (its forward, compiled when train.compile) and, with QAT on, `qat` from step
    `qat_start` on (compiled separately, so the switch costs one new graph, not a recompile per step)."""

    wrapped: Any
    plain: Callable
    qat: Callable | None = None
    qat_start: int = 0

    def at(self, step: int) -> tuple[Callable, bool]:
        """The forward of `step` and whether it fake-quantizes."""
        qat_on = self.qat is not None and step >= self.qat_start
        return (self.qat if qat_on else self.plain), qat_on


def build_forwards(model: KotodamaLM, cfg: RunConfig, info: DistInfo) -> Forwards:
    tcfg = cfg.train
    if tcfg.fp8:  # before DDP and compile see the layers; the swap keeps each weight Parameter
        from kotodama_core.train.fp8 import convert_linears_to_fp8
        convert_linears_to_fp8(model)
    wrapped = model
    if info.distributed:
        # Depth-recurrence parameters get no gradient before recurrence switches on.
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=model.has_conditionally_unused_parameters())
    qat, qat_start = None, tcfg.steps
    if tcfg.qat.enabled:
        from kotodama_core.quant.qat import QuantAwareForward, qat_start_step
        qat = QuantAwareForward(wrapped, tcfg.qat.bits)
        qat_start = qat_start_step(tcfg.steps, tcfg.qat.start_fraction)
    plain = wrapped
    if tcfg.compile:
        qat = torch.compile(qat) if qat is not None else None
        plain = compile_forward(model, tcfg.compile_scope, wrapped)
    return Forwards(wrapped, plain, qat, qat_start)


@dataclass
class StepResult:
    reduced: torch.Tensor     # [loss, ce] averaged over micro-steps and ranks, not yet read back
    grad_norm: torch.Tensor
    lr_mult: float
    qat_on: bool


def train_step(step: int, run: RunState, fwds: Forwards, cfg: RunConfig, info: DistInfo, accum: int,
               graph: StepGraph | None = None) -> StepResult:
    """One optimizer step: `accum` micro-batches forward and backward, clip, update, average; replayed
    from `graph` (train.cuda_graph) when one is given."""
    model, optimizer, total_steps = run.model, run.optimizer, cfg.train.steps
    model.set_training_progress(step / total_steps)
    mult = wsd_lr_multiplier(step, total_steps, cfg.schedule)
    optimizer.set_lr_multiplier(mult)
    call, qat_on = fwds.at(step)

    def body(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return step_body(run, fwds, call, cfg, info, accum, batches)

    if graph is None:  # each micro-batch fetched as its turn comes, while the device runs the one before
        mean, grad_norm = body(run.loader.next_batch().to(info.device, non_blocking=True) for _ in range(accum))
    else:  # what changes the step's Python path keys the graph
        key = (id(call), qat_on, model.effective_depth())
        mean, grad_norm = graph.run(key, step, [run.loader.next_batch() for _ in range(accum)], body)
    if run.averager is not None:
        run.averager.update(model, step + 1, mult, in_warmup=step < cfg.schedule.warmup_steps)
    return StepResult(all_reduce_mean(mean, info), grad_norm, mult, qat_on)


def step_body(run: RunState, fwds: Forwards, call: Callable, cfg: RunConfig, info: DistInfo, accum: int,
              batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's device work on `accum` device micro-batches of (batch, window) tokens: forward and
    backward each, clip, update, zero the gradients. Returns [loss, ce] averaged over the micro-batches
    and the gradient norm before clipping, not read back (a CUDA graph captures this function whole)."""
    model, optimizer = run.model, run.optimizer
    sums = torch.zeros(2, device=info.device)  # loss, ce summed over micro-steps
    for micro, batch in enumerate(batches):
        sync = info.distributed and micro < accum - 1
        with (fwds.wrapped.no_sync() if sync and hasattr(fwds.wrapped, "no_sync") else nullcontext()):
            with _autocast(cfg, info.device):
                loss, parts = call(batch[:, :-1], batch[:, 1:])
            (loss / accum).backward()
        sums += torch.stack([loss.detach().float(), parts["ce"].detach().float()])
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums / accum, grad_norm


def build_step_graph(cfg: RunConfig, run: RunState, info: DistInfo) -> StepGraph | None:
    """The step graph when train.cuda_graph is on and can apply here; where it cannot, rank 0 says why
    once and the run steps eagerly."""
    if not cfg.train.cuda_graph:
        return None
    why_not = step_graph_unavailable(info.device, info.world_size)
    if why_not is not None:
        if info.is_main:
            print(f"[train] train.cuda_graph is on, but {why_not}: every step runs eagerly", flush=True)
        return None
    return StepGraph(run.optimizer, info.device)


class LossReader:
    """Reads step losses back from the device one step late, so the next step's kernels are queued while
    the host waits; a step that logs, validates or saves reads its own loss first, so no non-finite loss
    reaches a checkpoint."""

    def __init__(self) -> None:
        self.loss, self.ce = math.nan, math.nan
        self._unread: tuple[int, torch.Tensor] | None = None

    def after(self, step: int, reduced: torch.Tensor, now: bool) -> None:
        if self._unread is not None:
            self.loss, self.ce = _read_loss(*self._unread)
            self._unread = None
        if now:
            self.loss, self.ce = _read_loss(step, reduced)
        else:
            self._unread = (step, reduced)


class RunLog:
    """Rank 0's records: metrics.jsonl, geo_metrics.jsonl, the metrics sink and the progress line.

    tokens/s = global_batch_tokens / (seconds since the last log ÷ steps since it);
    MFU = tokens/s × model FLOPs per token ÷ (device peak × world size)."""

    def __init__(self, cfg: RunConfig, work: Path, info: DistInfo, on_metrics: MetricsSink | None,
                 start_step: int) -> None:
        self.cfg, self.info, self.on_metrics = cfg, info, on_metrics
        self.metrics_path, self.geo_path = work / "metrics.jsonl", work / "geo_metrics.jsonl"
        self.flops_token = model_flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak = peak_flops(info.device)
        self.progress = Progress("train", cfg.train.steps, every_s=cfg.train.progress_every_s) if info.is_main else None
        self.last_val: float | None = None
        self._t_last, self._done_last = time.perf_counter(), start_step
        if info.is_main:
            _truncate_jsonl(self.metrics_path, start_step)  # a killed run may have logged past its checkpoint
            _truncate_jsonl(self.geo_path, start_step)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a stall, reported on its own) out of the next logged step time."""
        self._t_last += seconds

    def write(self, path: Path, step: int, values: dict[str, Any]) -> None:
        _append_jsonl(path, {"step": step, **values})
        if self.on_metrics:
            self.on_metrics(values, step)

    def step(self, step: int, out: StepResult, losses: LossReader, tokens_seen: int,
             averager: WeightAverager | None, has_qat: bool) -> None:
        if self.info.device.type == "cuda":
            torch.cuda.synchronize()
        done, now = step + 1, time.perf_counter()
        dt = (now - self._t_last) / (done - self._done_last)
        self._t_last, self._done_last = now, done
        tcfg, optim, mult = self.cfg.train, self.cfg.optim, out.lr_mult
        tok_s = tcfg.global_batch_tokens / dt
        record = {"loss": losses.loss, "ce": losses.ce, "lr_mult": mult, "lr_muon": optim.muon.lr * mult,
                  "lr_adamw": optim.adamw.lr * mult, "grad_norm": float(out.grad_norm), "tokens_seen": tokens_seen,
                  "tokens_per_s": tok_s, "step_ms": dt * 1e3}
        if self.peak:
            record["mfu"] = tok_s * self.flops_token / (self.peak * self.info.world_size)
        if has_qat:
            record["qat"] = int(out.qat_on)
        if averager is not None:
            record["avg_updates"] = averager.updates
        self.write(self.metrics_path, step, record)
        self.progress.update(done, **progress_fields(record, self.last_val, self.info.device))

    def validation(self, step: int, val: float | None) -> None:
        if val is not None:
            self.last_val = val
            self.write(self.metrics_path, step, {"val_loss": val})

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class SlowWrites:
    """Says once per run, on rank 0, that a save had to wait for the previous background write: the
    writes take longer than the steps between checkpoints, and each save blocks the loop until then."""

    THRESHOLD_S = 1.0

    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps
        self.said = False

    def report(self, writer: CheckpointWriter, done: int) -> None:
        if self.said or writer.waited_for is None or writer.last_wait_s < self.THRESHOLD_S:
            return
        self.said = True
        print(f"[train] the step-{done} checkpoint waited {writer.last_wait_s:.1f} s for the step-"
              f"{writer.waited_for} write still in flight: a write takes longer than "
              f"train.checkpoint.every_steps={self.every_steps} steps, so every save blocks until the last "
              "one is published; raise train.checkpoint.every_steps to train through it", flush=True)


def checkpoint_state(cfg: RunConfig, run: RunState, done: int, tokens_seen: int, identity: dict[str, Any],
                     loader_states: list[Any], rngs: list[Any]) -> dict[str, Any]:
    """Everything step `done + 1` depends on (see the module docstring), plus what identifies the run."""
    resolved = cfg.model_dump(mode="json")
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": done,
             "tokens_seen": tokens_seen, "loader": loader_states, "rng": rngs, "config": resolved,
             "config_digest": digest(resolved), "model_digest": digest(cfg.section("model")),
             "total_steps": cfg.train.steps, "run_identity": identity}
    if run.averager is not None:
        state["averaging"] = run.averager.state_dict()
    return state


def save_step(cfg: RunConfig, run: RunState, done: int, tokens_seen: int, identity: dict[str, Any],
              writer: CheckpointWriter | None, info: DistInfo) -> float:
    """Gather every rank's data position and RNG, hand the state to rank 0's writer; seconds blocked."""
    t0 = time.perf_counter()
    loader_states = gather_objects(run.loader.state_dict(), info)
    rngs = gather_objects(ckpt.rng_state(), info)
    if writer is not None:
        writer.save(done, checkpoint_state(cfg, run, done, tokens_seen, identity, loader_states, rngs))
    barrier(info)
    return time.perf_counter() - t0


def _finish(cfg: RunConfig, data_dir: Path, work: Path, run: RunState, info: DistInfo,
            writer: CheckpointWriter | None) -> tuple[float | None, float | None, str | None]:
    """Rank 0: final validation (while the last checkpoint is still being written in the background),
    the final weights and the averaged ones (read back before publication).
    Returns (val_loss, val_loss_averaged, averaged_model_file)."""
    if not info.is_main:
        return None, None, None
    model, averager, tcfg = run.model, run.averager, cfg.train
    val_loss = evaluate_loss(model, data_dir, cfg, info.device, tcfg.val_batches)
    writer.close()
    ckpt.save_verified(model.state_dict(), work / "model.pt.zst")
    if averager is not None and averager.ready:
        avg_state = averager.averaged_state_dict(model)
        ckpt.save_verified(avg_state, work / AVERAGED_MODEL_FILE)
        averaged = copy.deepcopy(model)  # keeps non-persistent buffers (RoPE tables) as they are
        averaged.load_state_dict(avg_state)
        return val_loss, evaluate_loss(averaged, data_dir, cfg, info.device, tcfg.val_batches), AVERAGED_MODEL_FILE
    if averager is not None:
        warnings.warn(f"{averager.kind}: no snapshot was taken (the LR multiplier never fell below "
                      f"{tcfg.averaging.swa_lr_threshold} on a multiple of {tcfg.averaging.swa_every} "
                      "steps); no averaged model is written", stacklevel=3)
    return val_loss, None, None


def train(cfg: RunConfig, data_dir: Path, work: Path, *, init_path: Path | None = None,
          on_metrics: MetricsSink | None = None, info: DistInfo | None = None,
          identity: dict[str, Any] | None = None) -> TrainResult:
    """Train per `cfg` on the data artifact `data_dir`, checkpointing into `work/checkpoints`.

    `identity` (default: `default_identity`) is what this run is; `work` and its checkpoints must carry
    the same one, else the run refuses to resume (kotodama_core/train/guard.py)."""
    # Set-up.
    info = info or init_distributed()
    tcfg, total_steps = cfg.train, cfg.train.steps
    accum = tcfg.grad_accum_steps(info.world_size)
    identity = identity if identity is not None else default_identity(cfg, data_dir)
    budget = _set_up(cfg, data_dir, work, info, identity, on_metrics)
    milestones = set(tcfg.checkpoint.milestones)
    # Made first, so its worker process starts while the model is built.
    writer = CheckpointWriter(work / "checkpoints", keep_last=tcfg.checkpoint.keep_last,
                              milestones=sorted(milestones), background=tcfg.async_checkpoint
                              ) if info.is_main else None
    try:
        # Resume (or initialise).
        run = prepare_run(cfg, data_dir, work, info, init_path, identity)
        fwds = build_forwards(run.model, cfg, info)
        graph = build_step_graph(cfg, run, info)
        monitor = GeometryMonitor.build(cfg, data_dir, info)
        log = RunLog(cfg, work, info, on_metrics, run.start_step)  # its clock starts here, with the loop
        fault_step = int(os.environ.get(FAULT_KILL_ENV, "0") or 0)
        stalls, losses, tokens_seen = Stalls(on_stall=log.exclude), LossReader(), run.tokens_seen
        slow_writes = SlowWrites(tcfg.checkpoint.every_steps)
        run.model.train()
        for step in range(run.start_step, total_steps):
            # The step.
            out = train_step(step, run, fwds, cfg, info, accum, graph)
            if graph is not None and graph.captures and graph.captures[-1][0] == step:
                stalls.add("cuda_graph_capture", graph.captures[-1][1])  # host time only, like a compile
                if info.is_main:
                    log.write(log.metrics_path, step, {"cuda_graph_capture_s": graph.captures[-1][1]})
            tokens_seen += tcfg.global_batch_tokens
            done = step + 1
            log_now = step % tcfg.log_every == 0 or done == total_steps
            save_now = done % tcfg.checkpoint.every_steps == 0 or done in milestones or done == total_steps
            val_now = bool(tcfg.val_every) and done % tcfg.val_every == 0
            losses.after(step, out.reduced, now=log_now or save_now or val_now)
            # Logging, geometry and validation.
            if info.is_main and log_now:
                log.step(step, out, losses, tokens_seen, run.averager, has_qat=fwds.qat is not None)
            if monitor is not None and (step % tcfg.monitor.every_steps == 0 or done == total_steps):
                with stalls.timing("monitor", info.device):
                    geo = monitor.measure(run.model)
                log.write(log.geo_path, step, geo)
            if val_now and info.is_main:
                with stalls.timing("validation", info.device):
                    val = evaluate_loss(run.model, data_dir, cfg, info.device, tcfg.val_batches)
                log.validation(step, val)
            # Checkpointing.
            if save_now:
                stalls.add("checkpoint", save_step(cfg, run, done, tokens_seen, identity, writer, info))
                if info.is_main:
                    log.write(log.metrics_path, step, {"checkpoint_stall_s": stalls.last["checkpoint"],
                                                       "checkpoint_wait_s": writer.last_wait_s})
                    slow_writes.report(writer, done)
                if fault_step and done == fault_step and info.is_main:
                    writer.wait()  # "right after this step's checkpoint": once it is published
                    os.kill(os.getpid(), signal.SIGKILL)
        # Finish.
        log.close()
        val_loss, val_avg, avg_file = _finish(cfg, data_dir, work, run, info, writer)
    except BaseException:
        if writer is not None:  # keep the write in flight: it is a complete, earlier checkpoint
            close_quietly(writer)
        raise
    final_loss = losses.loss
    if info.is_main:  # a run resumed at its last step logs no loss of its own
        logged = last_finite_loss(log.metrics_path)
        final_loss = logged if logged is not None else final_loss
    barrier(info)
    return TrainResult(steps=total_steps, tokens_seen=tokens_seen, final_loss=final_loss, val_loss=val_loss,
                       resumed_from=run.start_step if run.resumed else None,
                       checkpoints=[p.name for _, p in ckpt.list_checkpoints(work / "checkpoints")],
                       metrics={"init": run.origin, **stalls.summary()}, averaged_model_file=avg_file,
                       val_loss_averaged=val_avg,
                       averaging_updates=run.averager.updates if run.averager is not None else 0,
                       status="completed_after_resume" if run.resumed else "completed", budget=budget)
