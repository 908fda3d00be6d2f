"""Training-stage config section: batch, length, precision, checkpoints, init mode, monitoring,
weight averaging and quantization-aware training."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from kotodama_core.quant.config import QATConfig
from kotodama_core.schema import StrictModel, require_positive


class CheckpointConfig(StrictModel):
    every_steps: int = 1000
    keep_last: int = 3
    milestones: list[int] = []


class InitConfig(StrictModel):
    """scratch: fresh init; resume: full state; weights: weights only, fresh optimizers, schedule from
    step 0 (bcpt); nca_transfer: keep every NCA tensor but the embedding/output head."""

    mode: Literal["scratch", "resume", "weights", "nca_transfer"] = "scratch"
    # A checkpoint file in any form (this project's .pt.zst, the original code's step_XXXXXXXX.pt or .pt.zst;
    # kotodama checkpoint inspect says which); or leave empty and pass the stage an `init` input (a
    # training artifact folder, or a folder written by kotodama checkpoint convert).
    checkpoint: str | None = None
    # Which checkpoint of an `init` training artifact: a step (e.g. the 72000 milestone) or None = final.
    step: int | None = None
    # nca_transfer only: leave every AttnRes query and key norm at its fresh init (routing reset at the
    # language transition, the control the Kotodama proxy report never ran).
    reset_attn_res: bool = False
    # resume only: go on when the checkpoint lacks parts this run cannot restore (an original checkpoint's
    # data position and RNG); the loader then starts from its beginning.
    allow_unmapped: bool = False

    @model_validator(mode="after")
    def _check(self) -> "InitConfig":
        if self.reset_attn_res and self.mode != "nca_transfer":
            raise ValueError(f"train.init.reset_attn_res applies to mode 'nca_transfer' only, not {self.mode!r}")
        return self


class MonitorConfig(StrictModel):
    enabled: bool = True
    every_steps: int = 75
    layers: list[int] = [0, 7, 14, 21, 27]
    probe_batch: int = 4
    probe_seq_len: int = 512
    probe_seed: int = 1234


class AveragingConfig(StrictModel):
    """none; ema: ema <- decay·ema + (1 - decay)·w after every step; swa: uniform mean of snapshots taken
    every `swa_every` steps once the LR multiplier is below `swa_lr_threshold`. Eval and export use the
    averaged weights (model_avg.pt.zst) when a run wrote them."""

    kind: Literal["none", "ema", "swa"] = "none"
    decay: float = 0.997
    swa_every: int = 50
    swa_lr_threshold: float = 0.2

    @model_validator(mode="after")
    def _check(self) -> "AveragingConfig":
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"train.averaging.decay must lie in (0, 1), got {self.decay}")
        if self.swa_every < 1:
            raise ValueError(f"train.averaging.swa_every must be positive, got {self.swa_every}")
        if self.swa_lr_threshold <= 0:
            raise ValueError(f"train.averaging.swa_lr_threshold must be positive, got {self.swa_lr_threshold}")
        return self


class TrainConfig(StrictModel):
    seed: int = 0
    seq_len: int = 4096
    micro_batch: int = 16
    global_batch_tokens: int = 2_097_152
    steps: int = 81_252
    grad_clip: float = 1.0
    # auto: bf16 autocast on CUDA, fp32 on CPU.
    # bf16_pure: the original's whole-model bf16 cast, optimizer states included (train/precision.py).
    precision: Literal["auto", "bf16", "fp32", "bf16_pure"] = "auto"
    compile: bool = False
    # model: torch.compile the whole forward (one graph, every layer unrolled); layers: compile the
    # repeated regions only (KotodamaLM.compile_regions: a few graphs, compiled in seconds, but the eager
    # code between them can make the step host-bound on a slow host: bench/RESULTS.md).
    compile_scope: Literal["model", "layers"] = "model"
    # Replay the whole training step (every micro-batch's forward and backward, clipping, the optimizer)
    # from one CUDA graph captured at the second step (train/step_graph.py), so the host's launches and the
    # eager code between compiled regions leave the device no gaps. One CUDA device; elsewhere the run says
    # so and steps eagerly, and a capture that fails is said once and the run steps eagerly.
    cuda_graph: bool = False
    # FP8 matmuls (torchao float8 training) for the hidden linear layers, CUDA only (train/fp8.py).
    fp8: bool = False
    # The AttnRes reads with the Triton kernels of kotodama_core/model/attnres_triton.py (phase 1 per
    # block; each merge read fused with its RMSNorm and the residual add before it) where the run is on
    # CUDA with Triton installed; elsewhere, or when false, the PyTorch reads. On one H200 they took the
    # proxy-108m step from 142 to 115 ms (bench/RESULTS.md).
    attn_res_kernels: bool = True
    # The dtype phase 1 of the AttnRes reads stores each read's mix in (attnres.AttnResRuntime):
    # float32, or activation (bf16 under bf16 autocast), which halves the mixes' traffic and rounds each
    # mix as the original code rounds each read (bench/RESULTS.md: 6.5 % against 8.5 % AttnRes cost;
    # 200-step tail loss within 0.002 of float32 over two seeds; routing gradients noisier). The
    # proxy-108m preset sets activation; the default stays float32, what runs recorded before the key ran.
    attn_res_mix_dtype: Literal["float32", "activation"] = "float32"
    nproc: int = 1
    log_every: int = 10
    val_every: int = 0
    val_batches: int = 8
    # Refuse to start when steps × global_batch_tokens exceeds this many passes over the training tokens
    # of the data artifact (kotodama_core/train/budget.py); null = no limit. 1.05 lets a one-pass card run
    # overshoot its mix by rounding and the held-out split, and refuses silent repetition.
    max_epochs: float | None = 1.05
    # Seconds between training progress lines (kotodama_core.progress; the first and last step always print).
    progress_every_s: float = 10.0
    # Checkpoints are written in the background from a CPU copy of the state, by a writer process (a thread
    # where Linux memfd is missing; train/checkpoint_writer.py); false = write in the loop.
    async_checkpoint: bool = True
    checkpoint: CheckpointConfig = CheckpointConfig()
    init: InitConfig = InitConfig()
    monitor: MonitorConfig = MonitorConfig()
    averaging: AveragingConfig = AveragingConfig()
    qat: QATConfig = QATConfig()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        require_positive(self, "train.", ("seq_len", "micro_batch", "global_batch_tokens", "steps", "nproc",
                                          "log_every"))
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ValueError(f"train.max_epochs must be positive or null, got {self.max_epochs}")
        return self

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that micro_batch·seq_len·world·accum = global_batch_tokens."""
        per_micro = self.micro_batch * self.seq_len * world_size
        if self.global_batch_tokens % per_micro:
            raise ValueError(
                f"train.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                f"micro_batch·seq_len·world_size = {self.micro_batch}·{self.seq_len}·{world_size} = {per_micro}")
        return self.global_batch_tokens // per_micro
