"""Pixels <-> keypoints (S1.1.1): keypoint ops, detector, appearance net, reconstructor, CNN-VRNN encoder.

Conventions. Images are float (N, 3, H, W) in [-0.5, 0.5], best in channels_last memory format. Keypoints
are (N, K, 3) triplets (x, y, mu): x in [-1, 1] from left to right, y in [-1, 1] from bottom to top (y
points up), mu >= 0 the keypoint's presence. Pixel (row i, column j) of an S x S map has its centre at
x = -1 + 2 j / (S - 1), y = 1 - 2 i / (S - 1) (the original code's grid), so one heatmap pixel is
2 / (S - 1) coordinate units; sigma of the Gaussian maps is given in heatmap pixels (supplement S4 of Minderer et al. 2019).

Keypoint arithmetic (S1-S4) always runs in float32, also under autocast: the convs may run in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.config import Heatmap, ModelConfig

EPSILON = 1e-6  # keeps the softplus normalisation (S1) finite when every R_k underflows


# ---------------------------------------------------------------------------------------------------------
# Keypoint ops (S1-S4)
# ---------------------------------------------------------------------------------------------------------


def coordinate_grid(size: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates of a size x size map: x (size,) left -> right = -1 -> 1, y (size,) top -> bottom = 1 -> -1."""
    x = torch.linspace(-1.0, 1.0, size, device=device)
    return x, -x


def pixels_to_units(pixels: float, size: int) -> float:
    """A length in pixels of a size x size map, in [-1, 1] coordinate units."""
    return pixels * 2.0 / (size - 1)


def conv_memory_format(module: nn.Module) -> torch.memory_format:
    """The layout of ``module``'s conv weights, for its activations to match: channels_last after
    ``model.to(memory_format=torch.channels_last)`` (the fast path on CPU and GPU), plain NCHW otherwise
    (e.g. the fp32 eager baseline of tests/bench/bench_train.py)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and layer.weight.shape[-1] > 1:  # 1x1 kernels fit both layouts
            weight = layer.weight
            return torch.contiguous_format if weight.is_contiguous() else torch.channels_last
    return torch.channels_last


def add_coordinate_channels(images: Tensor, memory_format: torch.memory_format = torch.channels_last) -> Tensor:
    """(N, C, H, W) -> (N, C + 2, H, W) with x and y coordinate channels appended (CoordConv)."""
    n, _, h, w = images.shape
    x, _ = coordinate_grid(w, images.device)
    _, y = coordinate_grid(h, images.device)
    coords = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]))  # (2, H, W)
    coords = coords.to(images.dtype)[None].expand(n, 2, h, w)
    return torch.cat([images, coords], dim=1).contiguous(memory_format=memory_format)


def detection_weights(logits: Tensor, heatmap: Heatmap, logit_scale: float) -> Tensor:
    """D_k (S1): (N, K, H, W) logits -> (N, K, H, W) float32 maps that sum to 1 over each map."""
    scaled = logits.float().flatten(2) * logit_scale  # (N, K, H*W)
    if heatmap == "softmax":
        weights = torch.softmax(scaled, dim=-1)
    else:
        raw = F.softplus(scaled) + EPSILON  # R_k > 0
        weights = raw / raw.sum(-1, keepdim=True)
    return weights.view_as(logits)


def maps_to_keypoints(logits: Tensor, heatmap: Heatmap = "softplus", logit_scale: float = 1.0) -> Tensor:
    """Keypoints from the detector's logits: (N, K, H, W) -> (N, K, 3) float32 (x, y, mu).

    (x_k, y_k) = sum_{u,v} (u, v) D_k(u, v)   (S2)
    mu_k = mean_{u,v} R_k(u, v), R_k = softplus(logits_k)   (S3)
    """
    with torch.autocast(logits.device.type, enabled=False):
        weights = detection_weights(logits, heatmap, logit_scale)  # (N, K, H, W)
        h, w = logits.shape[-2:]
        grid_x, _ = coordinate_grid(w, logits.device)
        _, grid_y = coordinate_grid(h, logits.device)
        x = (weights.sum(-2) * grid_x).sum(-1)  # marginal over rows, then centre of mass: (N, K)
        y = (weights.sum(-1) * grid_y).sum(-1)  # (N, K)
        mu = F.softplus(logits.float()).mean((-2, -1))  # (N, K)
        return torch.stack([x, y, mu], dim=-1)


def keypoints_to_maps(keypoints: Tensor, size: int, sigma: float, amplitude: Tensor | None = None) -> Tensor:
    """Gaussian maps (S4): (N, K, 3) -> (N, K, size, size) float32.

    R^_k(u, v) = a_k exp(-||(u, v) - (x_k, y_k)||^2 / (2 sigma^2)), sigma in heatmap pixels; the amplitude
    a_k is mu_k (the paper) unless ``amplitude`` (N, K) is given.
    """
    with torch.autocast(keypoints.device.type, enabled=False):
        keypoints = keypoints.float()
        width = pixels_to_units(sigma, size)
        grid_x, grid_y = coordinate_grid(size, keypoints.device)
        x, y, mu = keypoints.unbind(-1)  # (N, K) each
        gauss_x = torch.exp(-(grid_x - x[..., None]).square() / (2 * width**2))  # (N, K, W)
        gauss_y = torch.exp(-(grid_y - y[..., None]).square() / (2 * width**2))  # (N, K, H)
        a = mu if amplitude is None else amplitude.float()
        return (a[..., None, None] * gauss_y[..., :, None]) * gauss_x[..., None, :]  # (N, K, H, W)


# ---------------------------------------------------------------------------------------------------------
# Networks: 3x3 convs, leaky ReLU 0.2, He-uniform init, no normalisation layers (S1.1.1)
# ---------------------------------------------------------------------------------------------------------


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
    """A 'same'-padded conv with Keras' He-uniform kernel init and zero bias (S1.2)."""
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")  # U(-sqrt(6 / fan_in), +sqrt(6 / fan_in))
    nn.init.zeros_(layer.bias)
    return layer


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv(in_channels, out_channels, 3, stride), nn.LeakyReLU(0.2, inplace=True))


class ImageEncoder(nn.Module):
    """The detector's conv trunk (also the appearance net): (N, 3, S, S) -> (N, C, S', S').

    Coordinate channels; ``base_filters`` at full size; then per halving a stride-2 conv doubling the filters;
    ``layers_per_scale`` size-preserving convs at every scale. 64x64x3 -> 16x16x128 for the paper.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        filters = config.base_filters
        layers = [conv_block(3 + 2, filters)]
        layers += [conv_block(filters, filters) for _ in range(config.layers_per_scale)]
        for _ in range(config.num_scales):
            layers.append(conv_block(filters, 2 * filters, stride=2))
            filters *= 2
            layers += [conv_block(filters, filters) for _ in range(config.layers_per_scale)]
        self.layers = nn.Sequential(*layers)
        self.out_channels = filters

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(add_coordinate_channels(images, conv_memory_format(self)))


class KeypointDetector(nn.Module):
    """phi_det: images (N, 3, S, S) -> heatmap logits (N, K, S', S'); ``maps_to_keypoints`` makes keypoints."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.encoder = ImageEncoder(config)
        self.to_heatmaps = conv(self.encoder.out_channels, config.num_keypoints, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.to_heatmaps(self.encoder(images))


class Reconstructor(nn.Module):
    """phi_rec (S5): [maps(x_t), maps(x_1), appearance(v_1)] -> the image change from v_1.

    Coordinate channels and a 1x1 conv to C channels at heatmap size; per doubling: bilinear x2 upsampling
    and ``max(1, layers_per_scale)`` 3x3 convs, the first halving the filters; a linear 1x1 conv to RGB.
    The first 1x1 conv over the concatenation is computed as the sum of 1x1 convs over its parts (the same
    linear map), so the parts that are the same for every frame of a sequence (maps(x_1), appearance(v_1),
    coordinates) are computed once per sequence and broadcast over time instead of copied T times.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        channels = config.feature_channels
        k = config.num_keypoints
        self.from_maps = conv(k, channels, kernel_size=1)  # the x_t part of the 1x1 conv
        self.from_first = conv(k + channels + 2, channels, kernel_size=1)  # [maps(x_1), appearance, coords]
        # He-uniform over the fan-in of the whole concatenation, as one conv would be initialised.
        fan_in = 2 * k + channels + 2
        for layer in (self.from_maps, self.from_first):
            bound = (6.0 / fan_in) ** 0.5
            nn.init.uniform_(layer.weight, -bound, bound)
        nn.init.zeros_(self.from_maps.bias)
        nn.init.zeros_(self.from_first.bias)
        self.activation = nn.LeakyReLU(0.2, inplace=True)
        scales = []
        for _ in range(config.num_scales):
            layers: list[nn.Module] = [conv_block(channels, channels // 2)]
            channels //= 2
            layers += [conv_block(channels, channels) for _ in range(config.layers_per_scale - 1)]
            scales.append(nn.Sequential(*layers))
        self.scales = nn.ModuleList(scales)
        self.to_rgb = conv(channels, 3, kernel_size=1)
        # Zero-initialised output: training starts from v^_t = v_1 (copying the first frame) instead of
        # from a random image ~15x worse, so the first steps already teach the maps rather than the bias.
        nn.init.zeros_(self.to_rgb.weight)

    def forward(self, maps: Tensor, first_maps: Tensor, appearance: Tensor) -> Tensor:
        """maps (B*T, K, S', S') of the frames to draw; first_maps (B, K, S', S') and appearance (B, C, S', S')
        of each sequence's first frame -> (B*T, 3, S, S), frames ordered (b, t) like ``maps``."""
        batch = first_maps.shape[0]
        dtype = appearance.dtype
        layout = conv_memory_format(self)
        per_sequence = self.from_first(add_coordinate_channels(torch.cat([first_maps.to(dtype), appearance], 1), layout))
        per_frame = self.from_maps(maps.to(dtype).contiguous(memory_format=layout))
        x = per_frame.unflatten(0, (batch, -1)) + per_sequence[:, None]  # (B, T, C, S', S')
        x = self.activation(x.flatten(0, 1).contiguous(memory_format=layout))
        for scale in self.scales:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = scale(x)
        return self.to_rgb(x)  # (B*T, 3, S, S), linear


class FeatureEncoder(nn.Module):
    """CNN-VRNN's encoder: images (N, 3, S, S) -> unstructured features (N, K*3), LayerNorm bottleneck.

    The detector's trunk, a 1x1 conv to K channels, flatten, linear to K*3, LayerNorm without affine
    parameters (a tanh bottleneck saturated in training; the LayerNorm one did not).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.encoder = ImageEncoder(config)
        self.reduce = nn.Sequential(conv(self.encoder.out_channels, config.num_keypoints, 1), nn.LeakyReLU(0.2, inplace=True))
        self.project = nn.Linear(config.num_keypoints * config.heatmap_size**2, config.feature_size)
        self.norm = nn.LayerNorm(config.feature_size, elementwise_affine=False)

    def forward(self, images: Tensor) -> Tensor:
        features = self.reduce(self.encoder(images)).flatten(1)  # (N, K*S'*S')
        with torch.autocast(images.device.type, enabled=False):
            return self.norm(self.project(features.float()))  # (N, K*3) float32


class FeatureMaps(nn.Module):
    """CNN-VRNN's counterpart of the Gaussian maps: features (N, K*3) -> (N, K, S', S') by a linear layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.shape = (config.num_keypoints, config.heatmap_size, config.heatmap_size)
        self.project = nn.Linear(config.feature_size, config.num_keypoints * config.heatmap_size**2)

    def forward(self, features: Tensor) -> Tensor:
        return self.project(features).view(-1, *self.shape)
