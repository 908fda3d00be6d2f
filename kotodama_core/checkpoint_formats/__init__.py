"""Checkpoints of the original Kotodama code and of this project: safe reading, inspect, convert.

    ck = read_checkpoint("runs/fc/checkpoints")        # newest step; format "original-async", ...
    convert("step_00072000.pt.zst", "fc-72k", to="project")
"""

from kotodama_core.checkpoint_formats.convert import convert, to_original_state, to_project_state
from kotodama_core.checkpoint_formats.formats import Checkpoint, read_checkpoint, strip_prefixes
from kotodama_core.checkpoint_formats.safe_load import safe_load
from kotodama_core.checkpoint_formats.shape import infer_shape, num_parameters, shape_mismatches

__all__ = ["Checkpoint", "convert", "infer_shape", "num_parameters", "read_checkpoint", "safe_load",
           "shape_mismatches", "strip_prefixes", "to_original_state", "to_project_state"]
