"""train.fp8: FP8 matmuls for the hidden linear layers through torchao's float8 training.

Each selected nn.Linear becomes torchao's Float8Linear (the same weight Parameter, so the optimizer
built before the swap and the checkpoint keys are unchanged): per step its input, weight and output
gradient are cast to float8 with dynamic per-tensor scales (e4m3 forward, e5m2 gradients in torchao's
default recipe) and multiplied by torch._scaled_mm; the weights and optimizer states stay in their own
precision. Selected: the hidden matrices Muon updates (attn q/k/v/o_proj, ffn gate/up/down_proj), and
only where both dimensions are multiples of 16 (what the FP8 matmul needs); the embedding, the tied head
and the AttnRes reads keep bf16.
"""

from __future__ import annotations

from torch import nn

from kotodama_core.optim.hybrid import MUON_PARAM_PATTERN
from kotodama_core.schema import ConfigError


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules train.fp8 converts."""
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.Linear and MUON_PARAM_PATTERN.search(f"{name}.weight")
            and mod.in_features % 16 == 0 and mod.out_features % 16 == 0]


def convert_linears_to_fp8(model: nn.Module) -> list[str]:
    """Swap the fp8_linear_names layers for torchao Float8Linear in place; returns their names."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise ConfigError(f"train.fp8 needs torchao (pip install torchao; {exc}); set train.fp8: false "
                          "to train without it") from None
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ConfigError(f"train.fp8 needs a CUDA device with FP8 matmuls (sm_89 or newer); the model is on "
                          f"{device}: set train.fp8: false")
    names = set(fp8_linear_names(model))
    if not names:
        raise ConfigError("train.fp8: no hidden linear layer has both dimensions a multiple of 16")
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn in names)
    return sorted(names)
