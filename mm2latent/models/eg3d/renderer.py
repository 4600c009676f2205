"""EG3D's neural renderer: rays, tri-plane sampling, OSG decoder, volume rendering with importance sampling.

Equations and the order of random draws are those of NVlabs/eg3d ``training/volumetric_rendering``
(``RaySampler``, ``ImportanceRenderer``, ``MipRayMarcher2``) and ``training/triplane.py``
(``OSGDecoder``). Shapes: B images, M = n² rays, S samples per ray, C plane channels.

The renderer is stochastic by design (as in EG3D): the coarse samples are jittered inside their
depth bins and the fine samples are drawn from the coarse weights. Both draws come from the
``generator`` passed in, in NVIDIA's order (jitter, then importance), so a seeded generator
reproduces a render and NVIDIA's code seeded alike gives the same samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FullyConnectedLayer
from .options import AUTO, RenderingOptions

__all__ = [
    "OSGDecoder",
    "ray_box_limits",
    "ray_march",
    "render_rays",
    "sample_from_planes",
    "sample_pdf",
    "sample_rays",
]

# Sigmoid colour range widened by this on both sides (MipNeRF): colours can reach 0 and 1 exactly.
COLOR_MARGIN = 0.001
# The ray marcher's activation bias: softplus(sigma - 1) "makes things initialise better" (EG3D).
DENSITY_BIAS = 1.0
TRANSMITTANCE_EPS = 1e-10
PDF_EPS = 1e-5
IMPORTANCE_WEIGHT_FLOOR = 0.01
# Tri-plane projections: plane i reads these two world coordinates. EG3D's third plane reads
# (z, x), not (y, z) (the inverse of its third axis matrix): kept, the weights were trained on it.
PLANE_COORDINATES = ((0, 1), (0, 2), (2, 0))


def _rand(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) numbers from ``generator`` (the global RNG when None), on ``like``'s device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(device=like.device, dtype=like.dtype)


def sample_rays(
    cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and unit directions ``[B, n², 3]`` of the rays through the pixel centres (row-major).

    Args:
        cam2world: OpenCV camera-to-world matrices ``[B, 4, 4]``.
        intrinsics: normalised intrinsics ``[B, 3, 3]`` (focal, skew and principal point in image units).
        resolution: n, the side of the rendered image.
    """
    batch = cam2world.shape[0]
    assert cam2world.shape == (batch, 4, 4), cam2world.shape
    assert intrinsics.shape == (batch, 3, 3), intrinsics.shape
    device, dtype = cam2world.device, cam2world.dtype
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None]
    skew = intrinsics[:, 0, 1, None]
    pixels = torch.arange(resolution, dtype=dtype, device=device)
    uv = torch.stack(torch.meshgrid(pixels, pixels, indexing="ij")) * (1.0 / resolution) + (0.5 / resolution)
    uv = uv.flip(0).reshape(2, -1).transpose(1, 0).unsqueeze(0).repeat(batch, 1, 1)  # (x = column, y = row)
    x_cam, y_cam = uv[:, :, 0], uv[:, :, 1]
    z_cam = torch.ones_like(x_cam)
    x_lift = (x_cam - cx + cy * skew / fy - skew * y_cam / fy) / fx * z_cam
    y_lift = (y_cam - cy) / fy * z_cam
    points = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)
    world = torch.bmm(cam2world, points.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    origins = cam2world[:, :3, 3]
    directions = F.normalize(world - origins[:, None, :], dim=2)
    return origins.unsqueeze(1).repeat(1, directions.shape[1], 1), directions


def ray_box_limits(
    origins: torch.Tensor, directions: torch.Tensor, box_side: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances ``[..., 1]`` of rays through the centred cube of side ``box_side``.

    Slab method; rays that miss get (-1, -2).
    """
    shape = origins.shape[:-1]
    origins = origins.detach().reshape(-1, 3)
    directions = directions.detach().reshape(-1, 3)
    half = box_side / 2
    bounds = torch.tensor([[-half] * 3, [half] * 3], dtype=origins.dtype, device=origins.device)
    inverse = 1 / directions
    sign = (inverse < 0).long()
    near, far, valid = None, None, torch.ones(origins.shape[0], dtype=torch.bool, device=origins.device)
    for axis in range(3):
        axis_near = (bounds.index_select(0, sign[:, axis])[:, axis] - origins[:, axis]) * inverse[:, axis]
        axis_far = (bounds.index_select(0, 1 - sign[:, axis])[:, axis] - origins[:, axis]) * inverse[:, axis]
        if near is None:
            near, far = axis_near, axis_far
            continue
        valid[torch.logical_or(near > axis_far, axis_near > far)] = False
        near, far = torch.max(near, axis_near), torch.min(far, axis_far)
    near[~valid] = -1
    far[~valid] = -2
    return near.reshape(*shape, 1), far.reshape(*shape, 1)


def sample_from_planes(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float) -> torch.Tensor:
    """Bilinear features ``[B, 3, P, C]`` of world points ``[B, P, 3]`` on tri-planes ``[B, 3, C, H, W]``.

    The cube of side ``box_warp`` maps onto [-1, 1] plane coordinates; outside it features are zero.
    """
    batch, num_planes, channels, height, width = planes.shape
    num_points = coordinates.shape[1]
    assert num_planes == len(PLANE_COORDINATES) and coordinates.shape == (batch, num_points, 3), (
        planes.shape, coordinates.shape)
    coordinates = (2 / box_warp) * coordinates
    projected = torch.stack([coordinates[..., list(axes)] for axes in PLANE_COORDINATES], dim=1)
    grid = projected.reshape(batch * num_planes, 1, num_points, 2).float()
    features = F.grid_sample(
        planes.reshape(batch * num_planes, channels, height, width), grid,
        mode="bilinear", padding_mode="zeros", align_corners=False,
    )
    return features.permute(0, 3, 2, 1).reshape(batch, num_planes, num_points, channels)


class OSGDecoder(nn.Module):
    """Tri-plane features (mean of the three planes) -> raw density and colour features.

    Args:
        in_features: plane channels.
        hidden_features: width of the hidden layer (64 in EG3D).
        out_features: colour features; the first three are the raw RGB.
        lr_multiplier: learning-rate multiplier of both layers (``decoder_lr_mul``).
    """

    def __init__(
        self, in_features: int, hidden_features: int = 64, out_features: int = 32, lr_multiplier: float = 1.0
    ):
        super().__init__()
        self.net = nn.Sequential(
            FullyConnectedLayer(in_features, hidden_features, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnectedLayer(hidden_features, 1 + out_features, lr_multiplier=lr_multiplier),
        )

    def forward(self, sampled_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, P, C]`` -> (colours ``[B, P, out]`` in [-0.001, 1.001], raw densities ``[B, P, 1]``)."""
        x = sampled_features.mean(1)
        batch, num_points, channels = x.shape
        x = self.net(x.reshape(batch * num_points, channels)).reshape(batch, num_points, -1)
        colors = torch.sigmoid(x[..., 1:]) * (1 + 2 * COLOR_MARGIN) - COLOR_MARGIN
        return colors, x[..., 0:1]


def ray_march(
    colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, options: RenderingOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Volume rendering over sorted samples (MipNeRF-style: each interval takes its midpoint values).

    Args:
        colors: ``[B, M, S, C]``.
        densities: raw densities ``[B, M, S, 1]`` (activated here: softplus(sigma - 1)).
        depths: ``[B, M, S, 1]``, increasing along S.
        options: ``white_back`` is read.

    Returns:
        colour ``[B, M, C]`` scaled to [-1, 1] (from [0, 1]), depth ``[B, M, 1]`` (weighted mean of
        the interval midpoints, clamped to the range of all ``depths``), weights ``[B, M, S-1, 1]``.
    """
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    densities_mid = F.softplus(densities_mid - DENSITY_BIAS)
    alpha = 1 - torch.exp(-densities_mid * deltas)
    transmittance = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + TRANSMITTANCE_EPS], -2)
    weights = alpha * torch.cumprod(transmittance, -2)[:, :, :-1]
    rgb = torch.sum(weights * colors_mid, -2)
    weight_total = weights.sum(2)
    depth = torch.sum(weights * depths_mid, -2) / weight_total
    depth = torch.clamp(torch.nan_to_num(depth, float("inf")), torch.min(depths), torch.max(depths))
    if options.white_back:
        rgb = rgb + 1 - weight_total
    return rgb * 2 - 1, depth, weights


def sample_pdf(
    bins: torch.Tensor, weights: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Inverse-transform samples ``[R, num_samples]`` of the piecewise-constant pdf ``weights`` over ``bins``.

    ``bins`` ``[R, K + 2]`` are bin edges and ``weights`` ``[R, K]``; as in EG3D (and NeRF before it),
    only the first ``K + 1`` edges are used.
    """
    num_rays, num_bins = weights.shape
    weights = weights + PDF_EPS
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    u = _rand((num_rays, num_samples), bins, generator).contiguous()
    indices = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(indices - 1, 0)
    above = torch.clamp_max(indices, num_bins)
    pairs = torch.stack([below, above], -1).view(num_rays, 2 * num_samples)
    cdf_pairs = torch.gather(cdf, 1, pairs).view(num_rays, num_samples, 2)
    bin_pairs = torch.gather(bins, 1, pairs).view(num_rays, num_samples, 2)
    denom = cdf_pairs[..., 1] - cdf_pairs[..., 0]
    denom = torch.where(denom < PDF_EPS, torch.ones_like(denom), denom)  # such bins are never drawn
    return bin_pairs[..., 0] + (u - cdf_pairs[..., 0]) / denom * (bin_pairs[..., 1] - bin_pairs[..., 0])


def _stratified_depths(
    origins: torch.Tensor,
    ray_start: float | torch.Tensor,
    ray_end: float | torch.Tensor,
    options: RenderingOptions,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``[B, M, S, 1]`` depths: S evenly spaced from start to end (inclusive), each jittered by up to one step.

    ``ray_start`` / ``ray_end`` are numbers, or ``[B, M, 1]`` per-ray limits ("auto").
    """
    batch, num_rays, _ = origins.shape
    count = options.depth_resolution
    if options.disparity_space_sampling:
        steps = torch.linspace(0, 1, count, device=origins.device).reshape(1, 1, count, 1)
        steps = steps.repeat(batch, num_rays, 1, 1)
        steps = steps + _rand(steps.shape, steps, generator) * (1 / (count - 1))
        return 1.0 / (1.0 / ray_start * (1.0 - steps) + 1.0 / ray_end * steps)
    if not isinstance(ray_start, torch.Tensor):
        depths = torch.linspace(ray_start, ray_end, count, device=origins.device)
        depths = depths.reshape(1, 1, count, 1).repeat(batch, num_rays, 1, 1)
        return depths + _rand(depths.shape, depths, generator) * ((ray_end - ray_start) / (count - 1))
    steps = torch.arange(count, dtype=torch.float32, device=origins.device) / (count - 1)
    depths = ray_start[None] + steps.reshape(-1, 1, 1, 1) * (ray_end - ray_start)[None]  # [S, B, M, 1]
    # NVIDIA jitters the permuted view with rand_like, which fills it in memory ([S, B, M, 1]) order.
    jitter = _rand(depths.shape, depths, generator).permute(1, 2, 0, 3)
    return depths.permute(1, 2, 0, 3) + jitter * ((ray_end - ray_start) / (count - 1))[..., None]


def _importance_depths(
    depths: torch.Tensor, weights: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``[B, M, num_samples, 1]`` depths drawn where the coarse weights (max-then-mean smoothed) are high."""
    with torch.no_grad():
        batch, num_rays, count, _ = depths.shape
        depths = depths.reshape(batch * num_rays, count)
        weights = weights.reshape(batch * num_rays, -1)  # count - 1 interval weights
        weights = F.max_pool1d(weights.unsqueeze(1).float(), 2, 1, padding=1)
        weights = F.avg_pool1d(weights, 2, 1).squeeze(1) + IMPORTANCE_WEIGHT_FLOOR
        midpoints = 0.5 * (depths[:, :-1] + depths[:, 1:])
        samples = sample_pdf(midpoints, weights[:, 1:-1], num_samples, generator)
    return samples.detach().reshape(batch, num_rays, num_samples, 1)


def _query(
    planes: torch.Tensor,
    decoder: OSGDecoder,
    origins: torch.Tensor,
    directions: torch.Tensor,
    depths: torch.Tensor,
    options: RenderingOptions,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colours ``[B, M, S, C]`` and raw densities ``[B, M, S, 1]`` at ``origins + depths * directions``."""
    batch, num_rays, count, _ = depths.shape
    points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(batch, -1, 3)
    colors, densities = decoder(sample_from_planes(planes, points, options.box_warp))
    if options.density_noise > 0:
        densities = densities + _rand_normal(densities, generator) * options.density_noise
    return colors.reshape(batch, num_rays, count, -1), densities.reshape(batch, num_rays, count, 1)


def _rand_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device).to(device=like.device, dtype=like.dtype)


def render_rays(
    planes: torch.Tensor,
    decoder: OSGDecoder,
    origins: torch.Tensor,
    directions: torch.Tensor,
    options: RenderingOptions,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render rays ``[B, M, 3]`` through tri-planes ``[B, 3, C, H, W]`` (EG3D's ``ImportanceRenderer``).

    A coarse pass at ``depth_resolution`` stratified depths; then, if ``depth_resolution_importance``
    > 0, a fine pass at depths drawn from the coarse weights, and the final march over both sets of
    samples merged in depth order.

    Returns:
        colour features ``[B, M, C']`` in [-1, 1], depth ``[B, M, 1]``, accumulated opacity ``[B, M, 1]``.
    """
    if options.ray_start == AUTO:
        ray_start, ray_end = ray_box_limits(origins, directions, options.box_warp)
        valid = ray_end > ray_start
        if torch.any(valid).item():
            # NVIDIA fills the missed rays with the smallest and largest *entry* distances.
            ray_start[~valid] = ray_start[valid].min()
            ray_end[~valid] = ray_start[valid].max()
    else:
        ray_start, ray_end = options.ray_start, options.ray_end
    depths = _stratified_depths(origins, ray_start, ray_end, options, generator)
    colors, densities = _query(planes, decoder, origins, directions, depths, options, generator)
    if options.depth_resolution_importance > 0:
        _, _, weights = ray_march(colors, densities, depths, options)
        fine_depths = _importance_depths(depths, weights, options.depth_resolution_importance, generator)
        fine = _query(planes, decoder, origins, directions, fine_depths, options, generator)
        fine_colors, fine_densities = fine
        depths = torch.cat([depths, fine_depths], dim=-2)
        colors = torch.cat([colors, fine_colors], dim=-2)
        densities = torch.cat([densities, fine_densities], dim=-2)
        _, order = torch.sort(depths, dim=-2)
        depths = torch.gather(depths, -2, order)
        colors = torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1]))
        densities = torch.gather(densities, -2, order)
    rgb, depth, weights = ray_march(colors, densities, depths, options)
    return rgb, depth, weights.sum(2)
