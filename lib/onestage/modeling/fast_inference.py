"""The inference fast path: what ``model(images)`` runs in eval mode under ``torch.no_grad`` / ``inference_mode``.

Three generic optimisations, none of which changes the algorithm:

* **BatchNorm folding** — every ``BatchNorm2d`` (eval statistics) and ``FrozenBatchNorm2d`` that directly follows a
  convolution is folded into that convolution's weight and bias, ``W' = W·γ/√(σ²+ε)``, ``b' = (b − μ)·γ/√(σ²+ε) + β``
  (:func:`fold_batchnorm`). Which norm follows which convolution is read from one traced forward pass with hooks,
  not from module names, so it works on any body (ResNet, EfficientNet-Lite, the mask branches, torchvision's own
  detectors); the folded copy is checked against the unfolded model on the trace input.
* **channels_last** — the copy's convolution weights (and so their activations) in NHWC, the layout oneDNN's CPU
  convolutions are fastest in.
* **bf16 autocast** — on CPUs that compute bf16 natively (AVX512-BF16 or AMX, detected at run time with
  :func:`onestage.engine.train.cpu_has_native_bf16`), the backbone, FPN and heads (``model.forward_parts``) run under
  ``torch.autocast("cpu", torch.bfloat16)`` — except the prediction layers each model lists in ``fp32_layers()``
  (:func:`keep_fp32`) — and their outputs are cast back to fp32 before inference proper (``model.detect``:
  decoding, NMS, dynamic mask heads, the blender, Matrix NMS), which stays in fp32.

It runs on a copy of the model (the *twin*), kept outside the module tree in a weak-keyed table (no extra
``state_dict`` keys, nothing for ``.to()``, an optimizer, ``pickle`` or ``copy.deepcopy`` to see) and rebuilt when
any parameter or buffer changes (an optimizer step, ``load_state_dict``, ``.to(device)``), so training and
checkpoints never see folded weights. The twin costs one more copy of the weights in memory.

On by default. Off, for everything: environment variable ``ONESTAGE_FAST_INFERENCE=0``. Off or tuned for one model:
``model.fast_inference = False`` or ``model.fast_inference = FastInference(bf16=False)``. It never applies in
training mode, with gradients enabled (so saliency or other gradient analysis sees the real parameters), while
tracing or exporting (``torch.jit``, ``torch.onnx``, ``torch.compile``), while a training-time feature cache is
attached to the backbone (the evaluations inside a ``fast``-preset training run read it), nor to
``model.forward_parts`` / ``model.detect`` called directly (the walkthroughs' intermediate results are the plain
model's).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from onestage.modeling.parts import flat_tensors, model_device

__all__ = ["FastInference", "fast_inference_options", "inference", "plain_inference", "fold_batchnorm",
           "conv_norm_pairs", "FoldCheckError", "Float32", "keep_fp32", "to_float32", "fast_twin", "ENV_SWITCH"]

#: The environment variable that turns the fast path off for every model (``0``, ``false``, ``off`` or ``no``).
ENV_SWITCH = "ONESTAGE_FAST_INFERENCE"


@dataclass(frozen=True)
class FastInference:
    """What the fast path applies. ``bf16``: ``"auto"`` (on CPUs with native bf16 only), True (on any CPU, emulated
    where not native — slower there) or False. ``channels_last`` and ``bf16`` apply on CPU only; on CUDA only the
    folding does (the CUDA fast path has not been measured yet)."""

    fold_bn: bool = True
    channels_last: bool = True
    bf16: object = "auto"

    def uses_bf16(self, device: torch.device) -> bool:
        if device.type != "cpu" or self.bf16 is False:
            return False
        if self.bf16 == "auto":
            from onestage.engine.train import cpu_has_native_bf16

            return cpu_has_native_bf16()
        return bool(self.bf16)

    def applied(self, device: torch.device) -> dict:
        """What of it runs on ``device``: ``{"fold_bn", "channels_last", "bf16"}`` (channels_last: CPU only)."""
        return {"fold_bn": self.fold_bn, "channels_last": self.channels_last and device.type == "cpu",
                "bf16": self.uses_bf16(device)}


def fast_inference_options(model: nn.Module) -> Optional[FastInference]:
    """The fast-path options of ``model`` (its ``fast_inference`` attribute: True/absent → the defaults, False/None →
    off, or a :class:`FastInference`), or None when the environment switch is off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    opts = getattr(model, "fast_inference", True)
    if opts is True:
        return FastInference()
    if not opts:
        return None
    if not isinstance(opts, FastInference):
        raise TypeError(f"model.fast_inference must be True, False or a FastInference, got {opts!r}")
    return opts


@contextlib.contextmanager
def plain_inference(model: nn.Module):
    """Within the block ``model(images)`` runs the plain path (fp32, nothing folded) — for comparisons with a
    reference computed from the same weights (the ONNX graph, the forward-parts identities)."""
    had = "fast_inference" in model.__dict__
    saved = model.__dict__.get("fast_inference")
    model.fast_inference = False
    try:
        yield model
    finally:
        if had:
            model.fast_inference = saved
        else:
            del model.fast_inference


def _applies(model: nn.Module) -> bool:
    if model.training or torch.is_grad_enabled():
        return False
    backbone = getattr(model, "backbone", None)
    if getattr(backbone, "feature_cache", None) is not None:
        # a training-time feature cache is attached (the ``fast`` training preset): its cached frozen-prefix
        # features serve this evaluation too, on the plain path they were computed with
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    compiler = getattr(torch, "compiler", None)
    return not (compiler is not None and compiler.is_compiling())


def inference(model: nn.Module, images: Sequence[Tensor]) -> List[dict]:
    """``model.detect(model.forward_parts(images))`` — through the fast twin where it applies (see the module doc).
    Every model's eval-mode ``forward`` is this call."""
    opts = fast_inference_options(model) if _applies(model) else None
    if opts is None:
        return model.detect(model.forward_parts(images))
    twin = fast_twin(model, opts)
    applied = opts.applied(model_device(model))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if applied["bf16"] else contextlib.nullcontext()
    with ctx:
        parts = twin.forward_parts(images)
    if applied["bf16"] or applied["channels_last"]:
        parts = to_float32(parts)
    return twin.detect(parts)


# ---------------------------------------------------------------------------------------------------------------
# The twin
# ---------------------------------------------------------------------------------------------------------------

#: model → (key, twin). Weak keys: a twin lives as long as its model, and is never pickled, saved or deep-copied
#: with it.
_TWINS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

def _fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (``_version`` counts in-place ops)."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in (*model.parameters(), *model.buffers()))


def _plain_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` that needs no gradients and never takes the fast path itself. (No feature
    cache comes along: :func:`inference` does not build a twin while one is attached.)"""
    twin = copy.deepcopy(model).eval()
    twin.requires_grad_(False)
    twin.fast_inference = False
    return twin


def _trace_images(model: nn.Module) -> List[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 96, 128, generator=g).to(model_device(model))]


def fast_twin(model: nn.Module, opts: FastInference) -> nn.Module:
    """The model's fast copy for ``opts``, built on first use and whenever the model's weights change."""
    key = (opts, _fingerprint(model))
    cached = _TWINS.get(model)
    if cached is not None and cached[0] == key:
        twin = cached[1]
    else:
        _TWINS.pop(model, None)  # free the stale twin before building the next
        with torch.inference_mode(False), torch.no_grad():
            twin = _build_twin(model, opts)
        _TWINS[model] = (key, twin)
    twin.cfg = model.cfg  # thresholds changed on the model (e.g. ``parts.low_thresholds``) apply to the twin
    return twin


def _build_twin(model: nn.Module, opts: FastInference) -> nn.Module:
    twin = _plain_copy(model)
    applied = opts.applied(model_device(model))
    if opts.fold_bn:
        images = _trace_images(model)
        try:
            fold_batchnorm(twin, lambda m: m.forward_parts(images), check=True)
        except FoldCheckError as e:
            warnings.warn(f"fast inference: BatchNorm folding skipped ({e})", RuntimeWarning)
            twin = _plain_copy(model)
    if applied["bf16"]:
        keep_fp32(twin, twin.fp32_layers() if hasattr(twin, "fp32_layers") else ())
    if applied["channels_last"]:
        twin.to(memory_format=torch.channels_last)
    return twin


class Float32(nn.Module):
    """``module`` run in fp32 inside a bf16 autocast region (its floating inputs cast up). Attribute reads fall
    through to the wrapped module (``.weight``, ``.bias``), so code that reads a layer's weights still works."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return self.module(*(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def keep_fp32(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Wrap in :class:`Float32`, in place, each convolution named in ``names`` — or, for a container, each one
    directly inside it (a ``ModuleList`` of per-level predictors); returns the names wrapped. Models list their
    prediction layers in ``fp32_layers()``: the convolutions whose outputs inference decodes directly (scores, box
    distances, dynamic parameters, bases), which the bf16 fast path keeps in fp32 so that these outputs are not
    rounded to bf16's 8-bit mantissa. Measured on the shipped checkpoints (``data/results/bench_cpu/README.md``):
    BlendMask's mask AP moved by −0.16 with these layers in bf16 and by −0.03 with them in fp32; the box APs moved
    alike either way (BlendMask −0.23 / −0.27, SOLOv2 −0.40 / −0.40) and not at all without bf16."""
    done = []
    for name in names:
        target = model.get_submodule(name)
        convs = [(name, target)] if isinstance(target, nn.Conv2d) else [
            (f"{name}.{child}", m) for child, m in target.named_children() if isinstance(m, nn.Conv2d)]
        for full, conv in convs:
            parent_name, _, attr = full.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, Float32(conv))
            done.append(full)
    return done


# ---------------------------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------------------------

class FoldCheckError(RuntimeError):
    """The folded module's output differs from the unfolded one's on the trace input."""


def _is_foldable_norm(m: nn.Module) -> bool:
    from torchvision.ops import FrozenBatchNorm2d

    if isinstance(m, FrozenBatchNorm2d):
        return True
    return isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and not m.training


def conv_norm_pairs(module: nn.Module, run: Callable[[nn.Module], object]) -> List[Tuple[str, str]]:
    """``(conv name, norm name)`` of every foldable norm whose input, in one call of ``run(module)``, is always the
    output of the same ``nn.Conv2d`` and of nothing else, and whose convolution feeds no other norm. ``module`` must
    be in eval mode (BatchNorm folds its running statistics)."""
    convs = {m: name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    norms = {m: name for name, m in module.named_modules() if _is_foldable_norm(m)}
    produced = {}  # id(output tensor) -> conv name; the tensors are kept alive so that ids stay unique
    alive = []
    sources = {}  # norm name -> set of conv names (None: an input no conv produced)

    def conv_hook(m, inputs, output):
        produced[id(output)] = convs[m]
        alive.append(output)

    def norm_hook(m, inputs):
        sources.setdefault(norms[m], set()).add(produced.get(id(inputs[0])))

    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_pre_hook(norm_hook) for m in norms]
    try:
        with torch.no_grad():
            run(module)
    finally:
        for h in handles:
            h.remove()
    pairs = [(next(iter(src)), norm) for norm, src in sources.items() if len(src) == 1 and None not in src]
    fed = [conv for conv, _ in pairs]
    return sorted((conv, norm) for conv, norm in pairs if fed.count(conv) == 1)


def _max_rel_diff(a, b) -> float:
    flat_a, flat_b = flat_tensors(a), flat_tensors(b)
    if len(flat_a) != len(flat_b):
        return float("inf")
    worst = 0.0
    for x, y in zip(flat_a, flat_b):
        if x.shape != y.shape:
            return float("inf")
        if x.is_floating_point() and x.numel():
            scale = max(float(x.abs().max()), 1e-6)
            worst = max(worst, float((x.float() - y.float()).abs().max()) / scale)
    return worst


def fold_batchnorm(module: nn.Module, run: Callable[[nn.Module], object], check: bool = True,
                   rtol: float = 1e-3) -> List[Tuple[str, str]]:
    """Fold, in place, every norm :func:`conv_norm_pairs` finds into its convolution (the norm becomes
    ``nn.Identity``); returns the pairs folded. ``check``: run ``run`` before and after and raise
    :class:`FoldCheckError` if any floating output moved by more than ``rtol`` of its largest magnitude."""
    module.eval()
    pairs = conv_norm_pairs(module, run)
    with torch.no_grad():
        before = run(module) if check else None
        for conv_name, norm_name in pairs:
            conv, norm = module.get_submodule(conv_name), module.get_submodule(norm_name)
            w = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
            b = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
            scale = w * torch.rsqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach(), requires_grad=False)
            conv.bias = nn.Parameter(((bias - norm.running_mean) * scale + b).detach(), requires_grad=False)
            parent_name, _, attr = norm_name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, nn.Identity())
    if check:
        with torch.no_grad():
            diff = _max_rel_diff(before, run(module))
        if not diff <= rtol:
            raise FoldCheckError(f"outputs moved by {diff:.2e} of their magnitude after folding {len(pairs)} norms")
    return pairs


def to_float32(obj):
    """``obj`` (a ``ForwardParts``, NamedTuple, list, dict, tensor) with every floating tensor as contiguous fp32
    (NCHW), the dtype and layout inference proper is written for."""
    if isinstance(obj, Tensor):
        return obj.float().contiguous() if obj.is_floating_point() else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_float32(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_float32(x) for x in obj))
    if isinstance(obj, dict):
        return type(obj)((k, to_float32(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(x) for x in obj)
    return obj
