"""Quantization: per-row int8/6/5/4 codes by parameter group, straight-through QAT, packed artifacts.

rowwise   quantize / dequantize / fake-quantize, int4 nibble and generic bit packing
groups    which bit width a parameter gets, by name
qat       the fake-quantized forward the training engine switches to for the last fraction of steps
artifact  the compressed `model.int.ptz` layout: write, read, rebuild the model
config    QuantBits, QATConfig, ExportConfig (kept free of torch: the config loader imports it)
"""

from kotodama_core.quant.config import ExportConfig, QATConfig, QuantBits

__all__ = ["ExportConfig", "QATConfig", "QuantBits"]
