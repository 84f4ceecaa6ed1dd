"""What every kernel file of ``onestage.ops`` needs from Triton, in one place: the (optional) import, whether the
interpreter is on, and the two dispatch questions — may a kernel run on this tensor, and does the environment force
the plain PyTorch references."""
from __future__ import annotations

import os

from torch import Tensor

try:  # Triton ships with PyTorch's CUDA wheels; a CPU-only install simply keeps the reference path.
    import triton
    import triton.language as tl
    HAS_TRITON = True
    # triton.jit picks the interpreter at decoration time, i.e. when the kernel modules are imported (after this one).
    TRITON_INTERPRET = bool(triton.knobs.runtime.interpret)
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None
    HAS_TRITON = False
    TRITON_INTERPRET = False

__all__ = ["triton", "tl", "HAS_TRITON", "TRITON_INTERPRET", "force_reference_from_env", "triton_supported"]


def force_reference_from_env() -> bool:
    """``ONESTAGE_FORCE_REFERENCE=1`` sends every op of ``onestage.ops`` to its plain PyTorch reference."""
    return os.environ.get("ONESTAGE_FORCE_REFERENCE", "0") not in ("", "0", "false", "False")


def triton_supported(tensor: Tensor) -> bool:
    """Whether the Triton kernels can run on ``tensor``'s device: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    return HAS_TRITON and (tensor.is_cuda or (TRITON_INTERPRET and tensor.device.type == "cpu"))
