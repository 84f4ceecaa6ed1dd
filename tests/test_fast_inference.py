"""The inference fast path (onestage.modeling.fast_inference): BatchNorm folding against torch.fx's own conv-BN fusion
and the unfolded modules, the fast path's detections against the plain path's on the shipped checkpoints, and its
switches. Speed is measured by ``python -m onestage bench``, never here."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import onestage
from onestage.modeling import fast_inference as fi
from onestage.modeling.fast_inference import FastInference, FoldCheckError, fold_batchnorm, plain_inference

from export_helpers import shipped_models

FP32 = FastInference(bf16=False)
SHIPPED = ["fcos", "condinst", "blendmask", "solo", "decoupled_solo", "solov2"]


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters in every BatchNorm / FrozenBatchNorm (fresh ones are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def test_fold_matches_torch_fx_fuse():
    """torch.fx's conv-BN fusion (torch.fx.experimental.optimization.fuse) is the oracle: resnet18's 20 BatchNorms
    folded by reading hooks give the same logits as fx's graph-rewriting fusion."""
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.rand(2, 3, 64, 64)
    ours = copy.deepcopy(model)
    pairs = fold_batchnorm(ours, lambda m: m(x))
    assert len(pairs) == 20 and ("layer1.0.conv1", "layer1.0.bn1") in pairs
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    with torch.no_grad():
        expected, got, plain = fuse(model)(x), ours(x), model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("body", ["resnet18", "efficientnet_lite0"])
def test_fold_frozen_bn_bodies(body):
    """FrozenBatchNorm2d (the papers' backbone norm) and TF-style SAME-padded convolutions fold too."""
    from onestage.modeling.backbone import EfficientNetLite0Body, ResNetBody

    torch.manual_seed(0)
    m = ResNetBody(body, norm="frozen_bn") if body == "resnet18" else EfficientNetLite0Body(norm="frozen_bn")
    m = _randomise_bn(m).eval()
    x = torch.rand(1, 3, 96, 80)
    with torch.no_grad():
        before = m(x)
        pairs = fold_batchnorm(m, lambda mod: mod(x))
        after = m(x)
    norms = 20 if body == "resnet18" else 48
    assert len(pairs) == norms and not any(isinstance(k, FrozenBatchNorm2d) for k in m.modules())
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-4)


class _TwoConsumers(nn.Module):
    """A convolution whose output feeds its BatchNorm *and* a residual sum: folding it would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_refuses_what_changes_the_output():
    m = _randomise_bn(_TwoConsumers()).eval()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(FoldCheckError):
        fold_batchnorm(m, lambda mod: mod(x))


def test_norms_not_after_a_conv_are_left_alone():
    m = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _randomise_bn(m)
    x = torch.rand(1, 3, 4, 4)
    assert fold_batchnorm(m, lambda mod: mod(x)) == []


@pytest.fixture(scope="module")
def shipped():
    return shipped_models(SHIPPED)


@pytest.fixture(scope="module")
def val_images():
    from onestage.data import get_dataset

    ds = get_dataset("synthetic", split="val", min_size=(256,), max_size=512, with_masks=False)
    return [ds[i][0] for i in range(2)]


@pytest.mark.parametrize("name", SHIPPED)
def test_fp32_fast_path_is_the_plain_path(name, shipped, val_images):
    """Folding + channels_last in fp32 change nothing but rounding: the same detections on trained weights."""
    model, _ = shipped[name]
    for image in val_images:
        with torch.inference_mode():
            with plain_inference(model):
                a = model([image])[0]
            model.fast_inference = FP32
            b = model([image])[0]
            del model.fast_inference
        assert len(a["scores"]) > 0 and len(a["scores"]) == len(b["scores"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])
        if "masks" in a:
            differ = (a["masks"] != b["masks"]).flatten(1).float().mean(1)
            assert float(differ.max()) < 1e-3
    twin = fi._TWINS[model][1]
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in twin.backbone.body.modules())


def test_bf16_fast_path_finds_the_same_objects(shipped, val_images):
    """bf16 (forced, so the test runs on any CPU) moves scores and boxes by rounding only: every confident plain
    detection has a bf16 one of the same class on the same object."""
    model, _ = shipped["condinst"]
    with torch.inference_mode():
        for image in val_images:
            with plain_inference(model):
                a = model([image])[0]
            model.fast_inference = FastInference(bf16=True)
            b = model([image])[0]
            del model.fast_inference
            keep = a["scores"] > 0.3
            assert keep.any()
            iou = torchvision.ops.box_iou(a["boxes"][keep], b["boxes"])
            same = a["labels"][keep][:, None] == b["labels"][None]
            assert bool(((iou > 0.9) & same).any(1).all())
            best = torch.where(same, iou, torch.zeros_like(iou)).argmax(1)
            assert float((b["scores"][best] - a["scores"][keep]).abs().max()) < 0.05


def _model():
    torch.manual_seed(0)
    return onestage.build_model("condinst", preset="smoke", num_classes=3).eval()


def test_switches_and_when_it_applies(monkeypatch):
    model, images = _model(), [torch.rand(3, 64, 64)]
    with torch.no_grad():
        model.fast_inference = False
        model(images)
        assert model not in fi._TWINS
        del model.fast_inference
        monkeypatch.setenv(fi.ENV_SWITCH, "0")
        model(images)
        assert model not in fi._TWINS
        monkeypatch.delenv(fi.ENV_SWITCH)
    model(images)  # gradients enabled: the real parameters, no twin
    assert model not in fi._TWINS
    fast = onestage.build_model("condinst", preset="smoke", num_classes=3, freeze_at=2).eval()
    fast.backbone.attach_feature_cache()
    with torch.no_grad():
        fast(images)  # a training-time feature cache is attached: it serves, on the plain path
    assert fast not in fi._TWINS and fast.backbone.feature_cache.stats["misses"] == 1
    keys = set(model.state_dict())
    with torch.no_grad():
        model(images)
    assert model in fi._TWINS
    assert set(model.state_dict()) == keys
    assert copy.deepcopy(model) not in fi._TWINS  # a copy of the model does not carry the twin
    with pytest.raises(TypeError):
        model.fast_inference = "yes"
        fi.fast_inference_options(model)


def test_twin_follows_the_weights_and_the_thresholds():
    model, image = _model(), torch.rand(3, 64, 64)
    model.fast_inference = FP32
    with torch.no_grad():
        model([image])
        first = fi._TWINS[model][1]
        model([image])
        assert fi._TWINS[model][1] is first  # cached while nothing changes
        model.head.cls_logits.bias.add_(5.0)  # in place, as an optimizer step: every location now scores high
        with plain_inference(model):
            plain = model([image])[0]
        fast = model([image])[0]
        assert fi._TWINS[model][1] is not first
        assert len(plain["scores"]) == len(fast["scores"]) > 0
        torch.testing.assert_close(fast["scores"], plain["scores"], rtol=0, atol=1e-4)
        model.cfg = dataclasses.replace(model.cfg, score_thresh=0.99)  # above every score: nothing is detected
        assert len(model([image])[0]["scores"]) == 0


def test_training_is_untouched():
    """Train mode never takes the fast path, and the model's own parameters stay unfolded and trainable."""
    model = _model()
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])
    model.train()
    assert any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("head."))


def test_alternating_order():
    from onestage import bench

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ABC"}
    bench._alternating(fns, repeats=3, warmup=1, device=torch.device("cpu"))
    assert "".join(calls) == "ABC" + "ABC" + "CBA" + "ABC"


@pytest.mark.parametrize("name", SHIPPED)
def test_bf16_keeps_the_prediction_layers_in_fp32(name):
    """Under bf16 the towers compute in bf16, and the layers each model lists in fp32_layers() in fp32; a wrapped
    layer still exposes its weights (SOLO's sparse inference reads them)."""
    torch.manual_seed(0)
    model = onestage.build_model(name, preset="smoke", num_classes=3).eval()
    model.fast_inference = FastInference(bf16=True)
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])
    twin = fi._TWINS[model][1]
    wrapped = {n: m for n, m in twin.named_modules() if isinstance(m, fi.Float32)}
    assert wrapped and all(any(n == f or n.startswith(f + ".") for f in model.fp32_layers()) for n in wrapped)
    dtypes = {}
    def record(name):
        def hook(module, inputs, output):
            dtypes.setdefault(name, output.dtype)
        return hook

    hooks = [m.register_forward_hook(record(n))
             for n, m in twin.named_modules() if isinstance(m, (nn.Conv2d, fi.Float32)) and not n.endswith(".module")]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        twin.forward_parts([torch.rand(3, 64, 64)])
    for h in hooks:
        h.remove()
    assert all(dtypes[n] == torch.float32 for n in wrapped if n in dtypes)
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if n not in wrapped)
    first = next(iter(wrapped.values()))
    assert first.weight is first.module.weight
