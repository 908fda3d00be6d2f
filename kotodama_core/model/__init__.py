"""The Kotodama model: config, decoder, Block Attention Residuals, RoPE and checkpoint I/O."""

from kotodama_core.model.attnres import attn_res_read
from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.io import CheckpointError, load_model, load_pt_zst, save_pt_zst
from kotodama_core.model.loss import chunked_lm_loss
from kotodama_core.model.model import KotodamaLM
from kotodama_core.model.norm import RMSNorm, rms_norm
from kotodama_core.model.techniques import TechniquesConfig

__all__ = ["KotodamaConfig", "KotodamaLM", "TechniquesConfig", "attn_res_read", "chunked_lm_loss",
           "RMSNorm", "rms_norm",
           "CheckpointError", "save_pt_zst", "load_pt_zst", "load_model"]
