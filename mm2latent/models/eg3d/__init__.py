"""EG3D (Chan et al., CVPR 2022) in pure PyTorch: the 3D-aware generator of the paper's 3D results.

Modules: :mod:`.layers` (NVIDIA-style StyleGAN2 layers of the backbone), :mod:`.renderer` (rays,
tri-plane sampling, OSG decoder, volume rendering), :mod:`.superresolution`, :mod:`.options`
(``rendering_kwargs``), :mod:`.generator` (``TriPlaneGenerator``), :mod:`.checkpoints` (NVIDIA
weights) and :mod:`.configs` (FFHQ 512² and tiny configurations).
"""

from .configs import TINY_EG3D_SEED, build_tiny_eg3d, ffhq512_config, tiny_eg3d_config
from .generator import RAY_SAMPLING_SEED, EG3DOutput, TriPlaneGenerator
from .options import RenderingOptions

__all__ = [
    "RAY_SAMPLING_SEED",
    "TINY_EG3D_SEED",
    "EG3DOutput",
    "RenderingOptions",
    "TriPlaneGenerator",
    "build_tiny_eg3d",
    "ffhq512_config",
    "tiny_eg3d_config",
]
