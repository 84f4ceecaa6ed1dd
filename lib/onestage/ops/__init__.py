"""Operators with a plain PyTorch reference (the CPU path and the test oracle) and, where it pays, a GPU kernel."""
from onestage.ops.dynamic_mask_head import (dynamic_mask_head, dynamic_mask_head_reference, mask_head_input_channels,
                                             num_dynamic_params, parse_dynamic_params)

__all__ = ["dynamic_mask_head", "dynamic_mask_head_reference", "mask_head_input_channels", "num_dynamic_params",
           "parse_dynamic_params"]
