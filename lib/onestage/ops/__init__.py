"""Operators with a plain PyTorch reference (the CPU path and the test oracle) and, where it pays, a GPU kernel.

Note: the package attribute ``dynamic_mask_head`` is the *function*; reach the module (kernels, switches) with
``importlib.import_module("onestage.ops.dynamic_mask_head")``.
"""
from onestage.ops.dynamic_mask_head import (dynamic_mask_head, dynamic_mask_head_reference, mask_head_input_channels,
                                             num_dynamic_params, parse_dynamic_params)
from onestage.ops.blender import blend, blend_reference
from onestage.ops.focal_loss import sigmoid_focal_loss

__all__ = ["blend", "blend_reference", "dynamic_mask_head", "dynamic_mask_head_reference", "mask_head_input_channels", "num_dynamic_params",
           "parse_dynamic_params", "sigmoid_focal_loss"]
