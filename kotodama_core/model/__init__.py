"""The Kotodama model: config, decoder, Block Attention Residuals, RoPE and checkpoint I/O."""

from __future__ import annotations

from kotodama_core.lazy import lazy_exports

# Imported on first use, so that reading a config (which imports the `config` submodule, and so this
# package) does not import torch: `kotodama check` and config errors answer in well under 2 s.
_EXPORTS = {
    "attn_res_read": "kotodama_core.model.attnres",
    "AttnResRuntime": "kotodama_core.model.attnres",
    "KotodamaConfig": "kotodama_core.model.config",
    "CheckpointError": "kotodama_core.model.io",
    "load_model": "kotodama_core.model.io",
    "load_pt_zst": "kotodama_core.model.io",
    "save_pt_zst": "kotodama_core.model.io",
    "chunked_lm_loss": "kotodama_core.model.loss",
    "KotodamaLM": "kotodama_core.model.model",
    "compile_forward": "kotodama_core.model.model",
    "RMSNorm": "kotodama_core.model.norm",
    "rms_norm": "kotodama_core.model.norm",
    "TechniquesConfig": "kotodama_core.model.techniques",
}

__all__ = ["AttnResRuntime", "KotodamaConfig", "KotodamaLM", "TechniquesConfig", "attn_res_read", "chunked_lm_loss",
           "compile_forward", "RMSNorm", "rms_norm",
           "CheckpointError", "save_pt_zst", "load_pt_zst", "load_model"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
