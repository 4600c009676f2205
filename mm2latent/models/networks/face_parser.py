"""BiSeNet face parser (zllrunning/face-parsing.PyTorch, ResNet-18 context path, 19 classes).

Module names follow that repository's ``model.py``/``resnet.py`` (``cp.resnet.layer1.0.conv1``,
``cp.arm16.conv_atten``, ``ffm.convblk``, ``conv_out.conv_out``, ...), so its ``79999_iter.pth`` loads
after a safetensors conversion. Its classes come in the face-parser order; :meth:`BiSeNet.parse`
returns CelebAMask-HQ ids through :data:`mm2latent.inputs.conditions.FACE_PARSER_TO_CELEBAMASK`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ...inputs.conditions import FACE_PARSER_TO_CELEBAMASK

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 feature maps.

    Args:
        width: channels of the first stage (64); later stages double it.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, width, 2 * width, 4 * width, 8 * width]
        for n in range(1, 5):
            stride = 1 if n == 1 else 2
            layer = nn.Sequential(BasicBlock(widths[n - 1], widths[n], stride), BasicBlock(widths[n], widths[n]))
            setattr(self, f"layer{n}", layer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * attention


class ContextPath(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        head = 2 * width
        self.resnet = ResNet18(width)
        self.arm16 = AttentionRefinementModule(4 * width, head)
        self.arm32 = AttentionRefinementModule(8 * width, head)
        self.conv_head32 = ConvBNReLU(head, head)
        self.conv_head16 = ConvBNReLU(head, head)
        self.conv_avg = ConvBNReLU(8 * width, head, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        feat32_sum = self.arm32(feat32) + F.interpolate(avg, feat32.shape[-2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[-2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[-2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, 1, 1, 0)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat * attention + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, num_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels)
        self.conv_out = nn.Conv2d(mid_channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module, PyTorchModelHubMixin):
    """BiSeNet face parser.

    Args:
        num_classes: output classes (19, face-parser order).
        width: ResNet-18 base width (64); the heads scale with it (128 / 256 at 64).
        input_size: images are resized to this before parsing (512).
    """

    def __init__(self, num_classes: int = 19, width: int = 64, input_size: int = 512):
        super().__init__()
        self.input_size = input_size
        self.cp = ContextPath(width)
        self.ffm = FeatureFusionModule(4 * width, 4 * width)
        self.conv_out = BiSeNetOutput(4 * width, 4 * width, num_classes)
        self.conv_out16 = BiSeNetOutput(2 * width, width, num_classes)
        self.conv_out32 = BiSeNetOutput(2 * width, width, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[None, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ImageNet-normalised [B, 3, H, W] -> logits [B, num_classes, H, W] (main head only)."""
        feat8, feat_cp8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, feat_cp8))
        return F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=True)

    def celebamask_logits(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> class logits in CelebAMask-HQ order, [B, 19, size, size] (differentiable).

        The parser's own label order is permuted with ``FACE_PARSER_TO_CELEBAMASK`` (channel c of the result is
        the parser's class that maps to CelebAMask-HQ class c), so a cross-entropy against a CelebAMask-HQ mask
        needs no remapping.
        """
        size = size or images.shape[-1]
        # Antialiased, as the official inference's PIL bilinear resize is: without it 1024² inputs agree with the
        # official labels on 86.8 % of pixels, with it on 99.3 %.
        x = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        logits = F.interpolate(self(x), size=(size, size), mode="bilinear", align_corners=False)
        order = torch.from_numpy(np.argsort(FACE_PARSER_TO_CELEBAMASK)).to(logits.device)
        return logits.index_select(1, order)

    @torch.no_grad()
    def parse(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> CelebAMask-HQ class ids [B, size, size] (long), default at the input size."""
        return self.celebamask_logits(images, size).argmax(dim=1)


def tiny_face_parser_config() -> dict:
    """A toy BiSeNet (same code path) for tests."""
    return dict(num_classes=19, width=8, input_size=64)
