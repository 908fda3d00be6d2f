"""Model FLOPs per token and MFU."""

from __future__ import annotations

import torch

from kotodama_core.model.config import KotodamaConfig

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L4": 121e12}


def model_flops_per_token(cfg: KotodamaConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6·N_matmul + 12·L·T·H·d_head·(½ if causal).

    N_matmul counts the weights of every matmul (q, k, v, o, gate, up, down per layer and the output
    head); the second term is the attention score and value products, forward and backward.
    """
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = (d * cfg.num_attention_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2
                 + 3 * d * cfg.intermediate_size)
    n_matmul = cfg.num_layers * per_layer + cfg.vocab_size * d
    attention = 12 * cfg.num_layers * seq_len * cfg.num_attention_heads * hd * (0.5 if causal else 1.0)
    return 6 * n_matmul + attention


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known CUDA device, else None (no MFU on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA max allocated on a GPU, else the peak resident set (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
