"""The models on the kernel path and on the reference path agree: CondInst (fused focal loss + dynamic mask head),
BlendMask (fused focal loss + blender) and FCOS (fused focal loss), smoke preset, tiny images.

On a CPU-only machine the kernels run through Triton's interpreter: with ``TRITON_INTERPRET=1`` set before
``onestage.ops`` is imported, every dispatcher of ``onestage.ops`` (``triton_supported``) sends CPU tensors to the
Triton kernels, so no extra switch is needed. One subprocess (this file executed as a script) builds each model twice
from the same seed, runs a training step (losses, backward) and inference, once on the kernels and once with
``ONESTAGE_FORCE_REFERENCE=1`` (read by the dispatchers at every call), counts the kernel launches, and prints one
JSON record per model for the tests below.

Bounds (the kernels accumulate in fp32 in another order than the references): losses ``|kernel − ref| / |ref|``
≤ 1e-5 (measured: 0, the fp32 sums round to the same value); parameter gradients ``max|kernel − ref| / max|ref|`` per
parameter tensor, worst over the model, ≤ 1e-4 (measured 6.6e-6); inference: identical boxes/labels (the detector
does not use the kernels at inference), scores within 1e-6, and at most 0.1% of the mask pixels flipped (a
probability within rounding of the threshold; measured: none). The subprocess takes ≈ 30 s on one CPU thread.
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from triton_interpreter import run_interpreted

LOSS_BOUND = 1e-5
GRAD_BOUND = 1e-4
MASK_FLIP_BOUND = 1e-3

# model → the ops whose kernels it must launch: training forward + backward, then inference, where the mask heads
# run once per image (two images, both with detections)
MODELS = {
    "fcos": {"focal_loss": ["forward", "backward"]},
    "condinst": {"focal_loss": ["forward", "backward"],
                 "dynamic_mask_head": ["forward", "backward", "forward", "forward"]},
    "blendmask": {"focal_loss": ["forward", "backward"], "blender": ["forward", "backward", "forward", "forward"]},
}


def _square(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _batch():
    from onestage.structures import masks_to_boxes

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 96, generator=g)]
    targets = []
    for im in images:
        h, w = im.shape[1:]
        masks = torch.stack([_square(h, w, 8, 50, 10, 70), _square(h, w, 55, 75, 20, 40)])
        targets.append(dict(boxes=masks_to_boxes(masks).float(), labels=torch.tensor([1, 4]), masks=masks))
    return images, targets


def _relative(a, b):
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _run(name, force_reference, images, targets):
    import onestage

    os.environ["ONESTAGE_FORCE_REFERENCE"] = "1" if force_reference else "0"
    torch.manual_seed(0)
    # score_thresh 0: the untrained smoke model (prior 0.01) must still produce detections, i.e. masks to predict
    model = onestage.build_model(name, preset="smoke", num_classes=6, score_thresh=0.0, detections_per_img=8)
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        preds = model(images)
    return {k: v.detach() for k, v in losses.items()}, grads, preds


def _interpreter_checks() -> dict:
    torch.set_num_threads(1)
    modules = {name: importlib.import_module(f"onestage.ops.{name}")
               for name in ("focal_loss", "dynamic_mask_head", "blender")}
    assert all(m.TRITON_INTERPRET for m in modules.values()), "TRITON_INTERPRET=1 must be set before the import"
    launches = []
    for op, module in modules.items():  # count the kernel launches (the custom ops call these module globals)
        for direction in ("forward", "backward"):
            def spy(*args, _fn=getattr(module, f"_{direction}_triton"), _key=(op, direction)):
                launches.append(_key)
                return _fn(*args)
            setattr(module, f"_{direction}_triton", spy)
    images, targets = _batch()
    records = {}
    for name in MODELS:
        launches.clear()
        k_losses, k_grads, k_preds = _run(name, False, images, targets)
        kernel_launches = list(launches)
        launches.clear()
        r_losses, r_grads, r_preds = _run(name, True, images, targets)
        rec = dict(
            launches={op: [d for o, d in kernel_launches if o == op] for op in modules},
            reference_launches=len(launches),
            loss_names=[sorted(k_losses), sorted(r_losses)],
            losses={k: abs(float(k_losses[k]) - float(r_losses[k])) / max(abs(float(r_losses[k])), 1e-12)
                    for k in r_losses},
            grad_names_equal=sorted(k_grads) == sorted(r_grads),
            grads=max(_relative(k_grads[n], r_grads[n]) for n in r_grads),
            num_detections=[len(p["boxes"]) for p in r_preds],
            boxes_equal=all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
                            for a, b in zip(k_preds, r_preds)),
            scores=max(float((a["scores"] - b["scores"]).abs().max()) if len(b["scores"]) else 0.0
                       for a, b in zip(k_preds, r_preds)),
        )
        if "masks" in r_preds[0]:
            flipped = sum(int((a["masks"] != b["masks"]).sum()) for a, b in zip(k_preds, r_preds))
            total = sum(b["masks"].numel() for b in r_preds)
            rec["mask_flip_fraction"] = flipped / max(total, 1)
            rec["mask_pixels"] = total
        records[name] = rec
    os.environ.pop("ONESTAGE_FORCE_REFERENCE", None)
    return records


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_path_is_taken_and_reference_path_launches_nothing(interpreted, name):
    r = interpreted[name]
    for op, expected in MODELS[name].items():
        assert r["launches"][op] == expected, r["launches"]
    for op in ("focal_loss", "dynamic_mask_head", "blender"):
        if op not in MODELS[name]:
            assert r["launches"][op] == []
    assert r["reference_launches"] == 0


@pytest.mark.parametrize("name", list(MODELS))
def test_training_losses_and_gradients_agree(interpreted, name):
    r = interpreted[name]
    assert r["loss_names"][0] == r["loss_names"][1]
    assert all(err <= LOSS_BOUND for err in r["losses"].values()), r["losses"]
    assert r["grad_names_equal"]
    assert r["grads"] <= GRAD_BOUND, r["grads"]


@pytest.mark.parametrize("name", list(MODELS))
def test_inference_outputs_agree(interpreted, name):
    r = interpreted[name]
    assert all(n > 0 for n in r["num_detections"]), r["num_detections"]  # the mask path really ran
    assert r["boxes_equal"]
    assert r["scores"] <= 1e-6
    if name != "fcos":
        assert r["mask_pixels"] > 0
        assert r["mask_flip_fraction"] <= MASK_FLIP_BOUND, r["mask_flip_fraction"]


if __name__ == "__main__":  # the interpreter subprocess of the `interpreted` fixture
    print(json.dumps(_interpreter_checks()))
