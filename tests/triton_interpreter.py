"""What the Triton kernel tests (``tests/test_ops_*.py``) share: running a test file under Triton's interpreter,
counting kernel launches, the relative error they bound, and the offline sm_90 compile that reports registers.

Why a subprocess: ``TRITON_INTERPRET=1`` must be set before the kernels are decorated, i.e. before ``onestage.ops``
is imported, so each kernel test file runs itself as a script with that variable and prints one JSON object (its
``_interpreter_checks()``) that the parametrised tests read.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def relative_error(a, b) -> float:
    """``max|a − b| / max|b|`` in float64; 0 for two empty (or absent) tensors, inf when only ``b`` is empty."""
    if b is None or b.numel() == 0:
        return 0.0 if a is None or a.numel() == 0 or float(a.abs().max()) == 0.0 else float("inf")
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def spy_kernel_launches(module) -> list:
    """Wrap ``module._forward_triton`` / ``_backward_triton`` (the globals the custom op calls) so that every launch
    appends its name to the returned list; clear the list before each case."""
    launches = []
    for name in ("_forward_triton", "_backward_triton"):
        def spy(*args, _fn=getattr(module, name), _name=name):
            launches.append(_name)
            return _fn(*args)
        setattr(module, name, spy)
    return launches


def run_interpreted(test_file: str, timeout: int = 300) -> dict:
    """Run ``test_file`` as a script with ``TRITON_INTERPRET=1`` (one thread, kernels not forced off) and return the
    JSON object it prints last."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("ONESTAGE_FORCE_REFERENCE", None)
    proc = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compiled_resource_usage(fn, types: dict, constexprs: dict, num_warps: int, tmp_path) -> tuple:
    """Compile the Triton kernel ``fn`` offline for sm_90 and return ``(registers, stack bytes)`` as the bundled
    ``cuobjdump`` reports them (no GPU needed; skips when Triton's NVIDIA tools are missing)."""
    import pytest

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("Triton's bundled ptxas/cuobjdump are missing")
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = tmp_path / f"{fn.__name__}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert match, usage
    return int(match.group(1)), int(match.group(2))
