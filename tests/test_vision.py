"""Keypoint ops (S1-S4) against answers computed by hand, and the vision networks' shapes."""

from __future__ import annotations

import math

import pytest
import torch

from worldmodel.config import ModelConfig
from worldmodel.vision import (
    FeatureEncoder,
    ImageEncoder,
    KeypointDetector,
    Reconstructor,
    add_coordinate_channels,
    keypoints_to_maps,
    maps_to_keypoints,
)

SIZE = 16
PIXEL = 2.0 / (SIZE - 1)  # one heatmap pixel in coordinate units


def pixel_x(column: int) -> float:
    return -1.0 + column * PIXEL


def pixel_y(row: int) -> float:
    return 1.0 - row * PIXEL  # y points up: row 0 is the top, y = +1


def inverse_softplus(r: torch.Tensor) -> torch.Tensor:
    """logits whose softplus is r (r = 0 -> very negative logits)."""
    return torch.where(r > 0, torch.log(torch.expm1(r.clamp_min(1e-30))), torch.full_like(r, -100.0))


@pytest.mark.parametrize("heatmap", ["softplus", "softmax"])
def test_single_hot_pixel_gives_its_coordinates(heatmap: str) -> None:
    logits = torch.full((1, 1, SIZE, SIZE), -100.0)
    logits[0, 0, 3, 12] = 30.0  # row 3 (near the top), column 12 (right)
    x, y, mu = maps_to_keypoints(logits, heatmap)[0, 0].tolist()
    assert x == pytest.approx(pixel_x(12), abs=1e-5)  # 0.6
    assert y == pytest.approx(pixel_y(3), abs=1e-5)  # 0.6: above the centre, so positive
    assert mu == pytest.approx(30.0 / SIZE**2, rel=1e-5)  # S3: mean of softplus(logits)


def test_centre_of_mass_of_two_pixels() -> None:
    # R = 1 at (row 0, col 0) and 3 at (row 15, col 15): (x, y) = (1 * (-1, 1) + 3 * (1, -1)) / 4 = (0.5, -0.5)
    r = torch.zeros(1, 1, SIZE, SIZE)
    r[0, 0, 0, 0], r[0, 0, 15, 15] = 1.0, 3.0
    x, y, mu = maps_to_keypoints(inverse_softplus(r))[0, 0].tolist()
    assert (x, y) == (pytest.approx(0.5, abs=1e-4), pytest.approx(-0.5, abs=1e-4))
    assert mu == pytest.approx(4.0 / 256, rel=1e-4)


def test_softmax_logit_scale_sharpens() -> None:
    # Two logits 1 and 0: softmax x1 weights e/(1+e) = 0.731; x10: 0.99995.
    logits = torch.full((1, 1, SIZE, SIZE), -1e4)
    logits[0, 0, 0, 0], logits[0, 0, 0, 15] = 1.0, 0.0  # x = -1 and x = +1 on the top row
    x1 = maps_to_keypoints(logits, "softmax", 1.0)[0, 0, 0].item()
    x10 = maps_to_keypoints(logits, "softmax", 10.0)[0, 0, 0].item()
    w = math.e / (1 + math.e)
    assert x1 == pytest.approx(-w + (1 - w), abs=1e-5)
    assert x10 == pytest.approx(-1.0, abs=1e-3)


def test_softmax_at_scale_1_follows_a_bump_between_cells_where_scale_10_snaps_to_one() -> None:
    """Logits shaped as a bump whose peak moves across one heatmap cell, c = cell 7 + offset, with the
    logits falling by 1 per squared cell of distance: at scale 1 the keypoint follows c to within 1% of a
    cell (sub-cell positions, so a keypoint can move smoothly); at scale 10 the softmax puts its weight on
    the nearest cell and the keypoint stays within 10% of a cell of that cell's centre for offsets up to
    0.3 cell (docs/VISION.md, "Keypoints on a grid")."""
    columns = torch.arange(SIZE, dtype=torch.float32)
    for offset in torch.linspace(-0.3, 0.3, 7).tolist():
        centre = 7 + offset
        bump = -((columns - centre) ** 2)  # (W,) logits along the row, peak at column `centre`
        logits = (bump[None, :] - (torch.arange(SIZE)[:, None] - 4.0) ** 2)[None, None]  # row 4, (1, 1, H, W)
        x1 = maps_to_keypoints(logits, "softmax", 1.0)[0, 0, 0].item()
        x10 = maps_to_keypoints(logits, "softmax", 10.0)[0, 0, 0].item()
        assert x1 == pytest.approx(pixel_x(7) + offset * PIXEL, abs=0.01 * PIXEL), offset
        assert x10 == pytest.approx(pixel_x(7), abs=0.1 * PIXEL), offset


def test_gaussian_maps_known_values() -> None:
    sigma = 1.5  # heatmap pixels (S4)
    keypoints = torch.tensor([[[pixel_x(7), pixel_y(5), 0.8]]])  # centred on (row 5, column 7)
    maps = keypoints_to_maps(keypoints, SIZE, sigma)[0, 0]
    assert maps.shape == (SIZE, SIZE)
    assert maps[5, 7].item() == pytest.approx(0.8, rel=1e-5)  # mu at the centre
    assert maps[5, 8].item() == pytest.approx(0.8 * math.exp(-1 / (2 * sigma**2)), rel=1e-5)  # 1 px right
    assert maps[7, 6].item() == pytest.approx(0.8 * math.exp(-5 / (2 * sigma**2)), rel=1e-5)  # 2 down, 1 left
    fixed = keypoints_to_maps(keypoints, SIZE, sigma, amplitude=torch.ones(1, 1))[0, 0]
    assert fixed[5, 7].item() == pytest.approx(1.0)


def test_maps_and_keypoints_round_trip() -> None:
    # The centre of mass of a Gaussian blob far from the borders is its centre (S2 inverts S4).
    keypoints = torch.tensor([[[pixel_x(6), pixel_y(9), 0.5], [0.13, -0.21, 1.0]]])
    maps = keypoints_to_maps(keypoints, SIZE, 1.5)
    recovered = maps_to_keypoints(inverse_softplus(maps))
    torch.testing.assert_close(recovered[..., :2], keypoints[..., :2], atol=2e-3, rtol=0)
    torch.testing.assert_close(recovered[..., 2], maps.mean((-2, -1)), atol=1e-5, rtol=1e-4)


def test_coordinate_channels() -> None:
    images = torch.zeros(2, 3, 8, 8)
    out = add_coordinate_channels(images)
    assert out.shape == (2, 5, 8, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out[0, 3, 0, 0].item() == -1.0 and out[0, 3, 0, 7].item() == 1.0  # x: left -> right
    assert out[0, 4, 0, 0].item() == 1.0 and out[0, 4, 7, 0].item() == -1.0  # y: top -> bottom = 1 -> -1


def test_keypoint_math_is_float32_under_autocast() -> None:
    logits = torch.randn(2, 4, SIZE, SIZE).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keypoints = maps_to_keypoints(logits)
        maps = keypoints_to_maps(keypoints, SIZE, 1.5)
    assert keypoints.dtype == torch.float32 and maps.dtype == torch.float32


def test_paper_sized_networks() -> None:
    config = ModelConfig()  # paper: 64x64x(3+2) -> 32 -> 64 -> 128 filters at 16x16, K = 64
    images = torch.rand(2, 3, 64, 64).sub(0.5).contiguous(memory_format=torch.channels_last)
    encoder = ImageEncoder(config)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]  # 1 extra conv per scale
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1]
    features = encoder(images)
    assert features.shape == (2, 128, 16, 16)
    assert features.is_contiguous()  # activations follow the weights' layout: plain NCHW here
    fast = encoder.to(memory_format=torch.channels_last)(images)
    assert fast.is_contiguous(memory_format=torch.channels_last)  # ... and channels_last after .to()
    assert torch.allclose(fast, features, atol=1e-5)
    logits = KeypointDetector(config)(images)
    assert logits.shape == (2, 64, 16, 16)
    maps = torch.rand(2, 64, 16, 16)
    change = Reconstructor(config)(maps, maps, features)
    assert change.shape == (2, 3, 64, 64)
    assert change.abs().max().item() == 0.0  # zero-initialised output: starts by copying v_1


def test_feature_encoder_layer_norm_bottleneck() -> None:
    config = ModelConfig.smoke(variant="cnn-vrnn")
    features = FeatureEncoder(config)(torch.rand(3, 3, 64, 64) - 0.5)
    assert features.shape == (3, config.feature_size)
    torch.testing.assert_close(features.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(features.var(-1, unbiased=False), torch.ones(3), atol=1e-2, rtol=0)
