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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from kotodama_core.digest import digest
from kotodama_core.data.loader import TokenLoader
from kotodama_core.errors import UserError
from kotodama_core.model import KotodamaLM
from kotodama_core.model.attnres import AttnResRuntime
from kotodama_core.optim import build_optimizer, wsd_lr_multiplier
from kotodama_core.optim.averaging import WeightAverager
from kotodama_core.train import checkpoint as ckpt
from kotodama_core.train import guard
from kotodama_core.train.budget import TokenBudget, check_budget, token_budget
from kotodama_core.train.distributed import (DistInfo, all_reduce_mean, barrier, gather_objects,
                                             init_distributed)
from kotodama_core.train.init import load_weights_strict, nca_transfer, read_weights, resume_state
from kotodama_core.train.precision import apply_precision
from kotodama_core.progress import Progress
from kotodama_core.train.throughput import memory_gib, model_flops_per_token, peak_flops

if TYPE_CHECKING:  # the run config sits above the training package; annotations only
    from kotodama_core.config import RunConfig

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
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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

    summary(): `<kind>_stall_s_total` = Σ stalls and `<kind>_stall_s_max` = max stall, for each kind seen."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds.setdefault(kind, []).append(seconds)
        self.last[kind] = seconds

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


def prepare_run(cfg: RunConfig, data_dir: Path, work: Path, info: DistInfo,
                init_path: Path | None = None, identity: dict[str, Any] | None = None) -> RunState:
    """Build model, optimizer and loader; resume from the newest checkpoint in `work`, else apply init.
    A checkpoint in `work` written under another run identity is refused (guard.check_checkpoint)."""
    _check_vocab(cfg, data_dir)
    torch.manual_seed(cfg.train.seed)
    model = KotodamaLM(cfg.model, attn_res_runtime=AttnResRuntime(kernels=cfg.train.attn_res_kernels)).to(info.device)
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


def train(cfg: RunConfig, data_dir: Path, work: Path, *, init_path: Path | None = None,
          on_metrics: MetricsSink | None = None, info: DistInfo | None = None,
          identity: dict[str, Any] | None = None) -> TrainResult:
    """Train per `cfg` on the data artifact `data_dir`, checkpointing into `work/checkpoints`.

    `identity` (default: `default_identity`) is what this run is; `work` and its checkpoints must carry
    the same one, else the run refuses to resume (kotodama_core/train/guard.py)."""
    from kotodama_core.artifacts import read_manifest

    info = info or init_distributed()
    device = info.device
    tcfg = cfg.train
    accum = tcfg.grad_accum_steps(info.world_size)
    total_steps = tcfg.steps
    ckdir = work / "checkpoints"
    metrics_path, geo_path = work / "metrics.jsonl", work / "geo_metrics.jsonl"
    identity = identity if identity is not None else default_identity(cfg, data_dir)
    budget = token_budget(read_manifest(data_dir).data, total_steps, tcfg.global_batch_tokens, tcfg.max_epochs)
    check_budget(budget, str(data_dir))
    if info.is_main:
        print(budget.line(), flush=True)
        guard.claim_work_folder(work, identity)
        if on_metrics:
            on_metrics({"epochs": budget.epochs, "training_tokens": float(budget.training_tokens),
                        "tokens_to_see": float(budget.tokens_to_see)}, 0)
    barrier(info)
    run = prepare_run(cfg, data_dir, work, info, init_path, identity)
    model, optimizer, loader, averager = run.model, run.optimizer, run.loader, run.averager
    start_step, tokens_seen = run.start_step, run.tokens_seen
    if info.is_main:
        work.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(metrics_path, start_step)
        _truncate_jsonl(geo_path, start_step)

    fwd = model
    if info.distributed:
        # Depth-recurrence parameters get no gradient before recurrence switches on.
        fwd = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.has_conditionally_unused_parameters())
    qat_fwd, qat_start = None, total_steps
    if tcfg.qat.enabled:
        from kotodama_core.quant.qat import QuantAwareForward, qat_start_step
        qat_fwd = QuantAwareForward(fwd, tcfg.qat.bits)
        qat_start = qat_start_step(total_steps, tcfg.qat.start_fraction)
    if tcfg.compile:
        # Compiled separately, so the switch to QAT costs one new graph rather than a recompile per step.
        qat_fwd = torch.compile(qat_fwd) if qat_fwd is not None else None
        if tcfg.compile_scope == "layers":
            model.compile_regions()
            fwd_plain = fwd
        else:
            fwd_plain = torch.compile(fwd)
    else:
        fwd_plain = fwd

    monitor, probe = None, None
    layers = [i for i in tcfg.monitor.layers if i < cfg.model.num_layers]
    if tcfg.monitor.enabled and info.is_main:
        from kotodama_core.train.monitor import monitor_metrics
        monitor = monitor_metrics
        probe = _probe_batch(cfg, data_dir)
        if probe is not None:
            probe = probe.to(device)

    flops_token = model_flops_per_token(cfg.model, tcfg.seq_len)
    peak = peak_flops(device)
    fault_step = int(os.environ.get(FAULT_KILL_ENV, "0") or 0)
    milestones = set(tcfg.checkpoint.milestones)
    writer = ckpt.CheckpointWriter(ckdir, keep_last=tcfg.checkpoint.keep_last, milestones=sorted(milestones),
                                   background=tcfg.async_checkpoint) if info.is_main else None
    stalls = Stalls()
    progress = Progress("train", total_steps, every_s=tcfg.progress_every_s) if info.is_main else None
    last_val: float | None = None
    last_loss = math.nan
    unread: tuple[int, torch.Tensor] | None = None  # (step, [loss, ce]) not yet read back
    model.train()
    t_last, steps_since_log = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        model.set_training_progress(step / total_steps)
        mult = wsd_lr_multiplier(step, total_steps, cfg.schedule)
        optimizer.set_lr_multiplier(mult)
        qat_on = qat_fwd is not None and step >= qat_start
        call = qat_fwd if qat_on else fwd_plain
        sums = torch.zeros(2, device=device)  # loss, ce summed over micro-steps
        for micro in range(accum):
            batch = loader.next_batch().to(device, non_blocking=True)
            sync = info.distributed and micro < accum - 1
            with (fwd.no_sync() if sync and hasattr(fwd, "no_sync") else nullcontext()):
                with _autocast(cfg, device):
                    loss, parts = call(batch[:, :-1], batch[:, 1:])
                (loss / accum).backward()
            sums += torch.stack([loss.detach().float(), parts["ce"].detach().float()])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if averager is not None:
            averager.update(model, step + 1, mult, in_warmup=step < cfg.schedule.warmup_steps)
        tokens_seen += tcfg.global_batch_tokens
        steps_since_log += 1
        reduced = all_reduce_mean(sums / accum, info)
        done = step + 1
        log_now = step % tcfg.log_every == 0 or done == total_steps
        save_now = done % tcfg.checkpoint.every_steps == 0 or done in milestones or done == total_steps
        val_now = bool(tcfg.val_every) and done % tcfg.val_every == 0
        # Reading a loss waits for the GPU. Reading the previous step's loss instead of this one's keeps
        # this step's kernels queued meanwhile; steps that log, validate or save read their own first,
        # so no non-finite loss reaches a checkpoint.
        if unread is not None:
            last_loss, mean_ce = _read_loss(*unread)
            unread = None
        if log_now or save_now or val_now:
            last_loss, mean_ce = _read_loss(step, reduced)
        else:
            unread = (step, reduced)
        if info.is_main and log_now:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt = (now - t_last) / steps_since_log
            t_last, steps_since_log = now, 0
            tok_s = tcfg.global_batch_tokens / dt
            record = {"step": step, "loss": last_loss, "ce": mean_ce, "lr_mult": mult,
                      "lr_muon": cfg.optim.muon.lr * mult, "lr_adamw": cfg.optim.adamw.lr * mult,
                      "grad_norm": float(grad_norm), "tokens_seen": tokens_seen, "tokens_per_s": tok_s,
                      "step_ms": dt * 1e3}
            if peak:
                record["mfu"] = tok_s * flops_token / (peak * info.world_size)
            if qat_fwd is not None:
                record["qat"] = int(qat_on)
            if averager is not None:
                record["avg_updates"] = averager.updates
            _append_jsonl(metrics_path, record)
            if on_metrics:
                on_metrics({k: v for k, v in record.items() if k != "step"}, step)
            progress.update(done, **progress_fields(record, last_val, device))
        if monitor is not None and probe is not None and (step % tcfg.monitor.every_steps == 0
                                                          or done == total_steps):
            with stalls.timing("monitor", device):
                geo = monitor(model, probe, layers)
            _append_jsonl(geo_path, {"step": step, **geo})
            if on_metrics:
                on_metrics(geo, step)
        if val_now and info.is_main:
            with stalls.timing("validation", device):
                val = evaluate_loss(model, data_dir, cfg, device, tcfg.val_batches)
            if val is not None:
                last_val = val
                _append_jsonl(metrics_path, {"step": step, "val_loss": val})
                if on_metrics:
                    on_metrics({"val_loss": val}, step)
        if save_now:
            t0 = time.perf_counter()
            loader_states = gather_objects(loader.state_dict(), info)
            rngs = gather_objects(ckpt.rng_state(), info)
            if info.is_main:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                         "tokens_seen": tokens_seen, "loader": loader_states, "rng": rngs,
                         "config": cfg.model_dump(mode="json"), "config_digest": digest(cfg.model_dump(mode="json")),
                         "model_digest": digest(cfg.section("model")), "total_steps": total_steps,
                         "run_identity": identity}
                if averager is not None:
                    state["averaging"] = averager.state_dict()
                writer.save(done, state)
            barrier(info)
            stalls.add("checkpoint", time.perf_counter() - t0)
            if info.is_main:
                stall = {"checkpoint_stall_s": stalls.last["checkpoint"]}
                _append_jsonl(metrics_path, {"step": step, **stall})
                if on_metrics:
                    on_metrics(stall, step)
            if fault_step and done == fault_step and info.is_main:
                writer.wait()  # "right after this step's checkpoint": once it is published
                os.kill(os.getpid(), signal.SIGKILL)

    if progress is not None:
        progress.close()
    if writer is not None:
        writer.wait()
    val_loss, val_avg, avg_file = None, None, None
    if info.is_main:
        val_loss = evaluate_loss(model, data_dir, cfg, device, tcfg.val_batches)
        ckpt.save_verified(model.state_dict(), work / "model.pt.zst")
        if averager is not None and averager.ready:
            avg_state = averager.averaged_state_dict(model)
            ckpt.save_verified(avg_state, work / AVERAGED_MODEL_FILE)
            avg_file = AVERAGED_MODEL_FILE
            averaged = copy.deepcopy(model)  # keeps non-persistent buffers (RoPE tables) as they are
            averaged.load_state_dict(avg_state)
            val_avg = evaluate_loss(averaged, data_dir, cfg, device, tcfg.val_batches)
        elif averager is not None:
            warnings.warn(f"{averager.kind}: no snapshot was taken (the LR multiplier never fell below "
                          f"{tcfg.averaging.swa_lr_threshold} on a multiple of {tcfg.averaging.swa_every} "
                          "steps); no averaged model is written", stacklevel=2)
    if info.is_main:
        logged = last_finite_loss(metrics_path)  # a run resumed at its last step logs no loss of its own
        last_loss = logged if logged is not None else last_loss
    barrier(info)
    return TrainResult(steps=total_steps, tokens_seen=tokens_seen, final_loss=last_loss, val_loss=val_loss,
                       resumed_from=start_step if run.resumed else None,
                       checkpoints=[p.name for _, p in ckpt.list_checkpoints(ckdir)],
                       metrics={"init": run.origin, **stalls.summary()}, averaged_model_file=avg_file, val_loss_averaged=val_avg,
                       averaging_updates=averager.updates if averager is not None else 0,
                       status="completed_after_resume" if run.resumed else "completed", budget=budget)
