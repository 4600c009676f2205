"""IR-SE50 ArcFace identity network (the pSp / InsightFace ``Backbone(112, 50, mode="ir_se")``).

Module names follow pSp's ``models/encoders/model_irse.py`` (``input_layer``, ``body.N.res_layer``,
``body.N.shortcut_layer``, ``output_layer``), so the state dict of ``model_ir_se50.pth`` loads after a
plain safetensors conversion (see ``mm2latent.models.networks.checkpoints``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ...errors import InvalidSettingError

# (in_channels, depth, num_units) of the four stages of IR-50; the first unit of each stage has stride 2.
IR50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))

#: The face box ArcFace reads, (top, bottom, left, right) in units of a 256² image, per framing of the input:
#: "ffhq" is pSp's ``IDLoss`` crop of FFHQ-aligned faces (rows 35:223, columns 32:220); "eg3d" is that same
#: box carried into EG3D's crop (``training/prepare_3d.py``), the mean over the 14 FFHQ photos of the test data
#: (spread ±4–7 of 256), so a 3D generator's outputs are cropped around the same part of the face.
FACE_CROPS = {"ffhq": (35.0, 223.0, 32.0, 220.0), "eg3d": (9.5, 204.2, 28.2, 222.9)}


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class SEModule(nn.Module):
    """Squeeze-and-excitation gate.

    Args:
        channels: feature channels.
        reduction: bottleneck ratio of the gate.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, max(1, channels // reduction), 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(max(1, channels // reduction), channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """Improved residual unit with an SE gate (``bottleneck_IR_SE``).

    Args:
        in_channels: input channels.
        depth: output channels.
        stride: spatial stride of the unit.
        reduction: SE reduction.
    """

    def __init__(self, in_channels: int, depth: int, stride: int, reduction: int = 16):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module, PyTorchModelHubMixin):
    """ArcFace IR-SE50: an aligned 112x112 face in [-1, 1] -> a unit-norm identity embedding.

    Args:
        stages: (in_channels, depth, num_units) per stage; the default is IR-50.
        embedding_dim: size of the embedding (512).
        input_size: input height/width (112).
        se_reduction: reduction of the SE gates.
        drop_ratio: dropout before the embedding layer (inactive in eval mode).
    """

    def __init__(
        self,
        stages: tuple | list = IR50_STAGES,
        embedding_dim: int = 512,
        input_size: int = 112,
        se_reduction: int = 16,
        drop_ratio: float = 0.6,
    ):
        super().__init__()
        stages = [tuple(s) for s in stages]
        first = stages[0][0]
        self.input_size = input_size
        self.face_crop = "ffhq"  # the framing embed() crops for: a key of FACE_CROPS (set "eg3d" for EG3D outputs)
        self.input_layer = nn.Sequential(nn.Conv2d(3, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.PReLU(first))
        units = []
        for in_channels, depth, num_units in stages:
            units.append(BottleneckIRSE(in_channels, depth, 2, se_reduction))
            units += [BottleneckIRSE(depth, depth, 1, se_reduction) for _ in range(num_units - 1)]
        self.body = nn.Sequential(*units)
        last = stages[-1][1]
        spatial = input_size // 2 ** len(stages)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(last), nn.Dropout(drop_ratio), Flatten(),
            nn.Linear(last * spatial * spatial, embedding_dim), nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, 112, 112] in [-1, 1] -> [B, embedding_dim], L2-normalised."""
        assert x.shape[-2:] == (self.input_size, self.input_size), f"expected {self.input_size}² faces, got {tuple(x.shape)}"
        x = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(x, dim=1)

    def embed(self, images: torch.Tensor, framing: str | None = None) -> torch.Tensor:
        """Embed faces of any size in [-1, 1], cropped as pSp's ``IDLoss`` does.

        pSp crops rows 35:223 and columns 32:220 of a 256² FFHQ-aligned face, then pools to 112²; the same
        fractions are used at every resolution. EG3D's crop frames faces differently: its box is
        ``FACE_CROPS["eg3d"]``.

        Args:
            images: [B, 3, H, W] faces in [-1, 1].
            framing: a key of :data:`FACE_CROPS` (default ``self.face_crop``, "ffhq" unless set).
        """
        framing = framing or self.face_crop
        if framing not in FACE_CROPS:
            raise InvalidSettingError(f"unknown face framing {framing!r}: expected one of {sorted(FACE_CROPS)}")
        size = images.shape[-1]
        top, bottom, left, right = (round(size * v / 256) for v in FACE_CROPS[framing])
        face = images[:, :, top:bottom, left:right]
        face = F.adaptive_avg_pool2d(face, self.input_size)
        return self(face)


def tiny_arcface_config() -> dict:
    """A toy IR-SE net (same code path) for tests."""
    return dict(stages=((8, 8, 1), (8, 16, 1), (16, 16, 1), (16, 32, 1)), embedding_dim=32, input_size=112,
                se_reduction=4)
