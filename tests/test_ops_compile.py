"""The Triton kernels compile, offline, for a real GPU target (sm_90 via Triton's bundled ptxas) — no GPU needed.

The interpreter tests (tests/test_ops_focal_loss.py, tests/test_ops_dynamic_mask_head.py) check the numerics but run
the kernels as NumPy; this catches what only the GPU compiler rejects (types, layouts, constexpr scoping) and that
no configuration spills registers to local memory at the default head shape.
"""
from __future__ import annotations

import importlib

import pytest
from triton_interpreter import compiled_resource_usage

triton = pytest.importorskip("triton")
if triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions in this process", allow_module_level=True)

DMH = importlib.import_module("onestage.ops.dynamic_mask_head")
FL = importlib.import_module("onestage.ops.focal_loss")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_focal_kernels_compile(dtype, tmp_path):
    types = dict(logits_ptr=f"*{dtype}", targets_ptr="*i64", partial_ptr="*fp32", grad_out_ptr="*fp32",
                 grad_ptr=f"*{dtype}", num_rows="i32", num_cols="i32", stride_row="i32", stride_col="i32",
                 alpha_pos="fp32", alpha_neg="fp32", gamma="fp32")
    blocks = dict(BLOCK_R=FL.BLOCK_ROWS, BLOCK_C=FL.BLOCK_COLS)
    for kernel in (FL._focal_fwd_kernel, FL._focal_bwd_kernel):
        registers, stack = compiled_resource_usage(kernel, types, blocks, FL.NUM_WARPS, tmp_path)
        assert stack == 0 and registers < 255


@pytest.mark.parametrize("head", [(8, 8, 3, "rel"), (8, 8, 1, "none")], ids=["default_rel", "one_layer_none"])
def test_dynamic_mask_head_kernels_compile_without_spills(head, tmp_path):
    consts = DMH._kernel_constants(*head)
    types = dict(feats_ptr="*fp32", params_ptr="*fp32", im_inds_ptr="*i64", order_ptr="*i64",
                 image_start_ptr="*i64", loc_ptr="*fp32", soi_ptr="*fp32", out_ptr="*fp32", grad_out_ptr="*fp32",
                 grad_feats_ptr="*fp32", partial_ptr="*fp32", first_instance="i32", num_instances="i32", H="i32",
                 W="i32", stride="i32", num_params="i32")
    fwd = compiled_resource_usage(DMH._dmh_forward_kernel, types, dict(consts, BLOCK=DMH.FWD_BLOCK),
                                  DMH.FWD_NUM_WARPS, tmp_path)
    bwd = compiled_resource_usage(DMH._dmh_backward_kernel, types, dict(consts, BLOCK=DMH.BWD_BLOCK),
                                  DMH.BWD_NUM_WARPS, tmp_path)
    for registers, stack in (fwd, bwd):
        assert stack == 0 and registers < 255, (fwd, bwd)  # no spills to local memory
