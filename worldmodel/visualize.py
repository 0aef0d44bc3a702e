"""Pictures of a run: keypoints drawn on frames (PNG) and real-beside-predicted videos (GIF).

Layout follows the paper's Figure 2: observed steps then predicted steps, real frames beside the
model's frames. In both pictures a green border marks observed steps (the model saw these frames)
and a red border predicted steps (open loop from the actions).

PNG: for each shown sequence two rows over time: the real frame with the *detected* keypoints, and
the model's frame (reconstructed from the posterior on observed steps, decoded from the best sampled
prediction afterwards) with the *predicted* keypoints. Marker colour identifies the keypoint, marker
opacity its intensity (the third keypoint channel: mu, or the Gaussian map's amplitude as the
caller passes it), so a collapsed detector (all keypoints in one spot, or all mu ~ 0) is visible
at a glance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from worldmodel.atomic import atomic_write

OBSERVED_COLOUR = (40, 200, 40)
PREDICTED_COLOUR = (220, 40, 40)


def keypoints_to_pixels(keypoints: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Keypoint (x, y) in [-1, 1] with y pointing up -> (column, row) pixel coordinates.

    The coordinate grid spans the pixel centres: x = -1 is the centre of column 0, x = 1 of column
    size - 1 (the detector's ``linspace(-1, 1, size)`` grid).
    """
    columns = (keypoints[..., 0] + 1.0) / 2.0 * (size - 1)
    rows = (1.0 - keypoints[..., 1]) / 2.0 * (size - 1)
    return columns, rows


def _to_uint8_hwc(frames: Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8."""
    array = frames.detach().float().clamp(0, 1).cpu().numpy()
    return (np.moveaxis(array, -3, -1) * 255.0 + 0.5).astype(np.uint8)


def _with_border(image: np.ndarray, colour: tuple[int, int, int], width: int) -> np.ndarray:
    framed = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3), np.uint8)
    framed[:] = colour
    framed[width:-width, width:-width] = image
    return framed


def save_keypoint_png(
    path: Path,
    real_frames: Tensor,
    model_frames: Tensor,
    detected: Tensor | None,
    predicted: Tensor | None,
    num_observed: int,
    max_sequences: int = 6,
    title: str = "",
    border: int = 2,
) -> None:
    """Write the keypoint picture; frames (B, T, 3, H, W) in [0, 1], keypoints (B, T, K, 3) or None.

    One image of tiles (one matplotlib axes: fast even for many frames): per sequence a row of real
    frames with detected keypoints and a row of model frames with predicted keypoints.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    num_sequences = min(max_sequences, real_frames.shape[0])
    length, size = real_frames.shape[1], real_frames.shape[-1]
    tile = size + 2 * border + 2  # frame, coloured border, white gap
    rows = [(_to_uint8_hwc(real_frames[:num_sequences]), detected), (_to_uint8_hwc(model_frames[:num_sequences]), predicted)]
    canvas = np.full((2 * num_sequences * tile, length * tile, 3), 255, np.uint8)
    xs, ys, colours = [], [], []
    palette = None
    for sequence in range(num_sequences):
        for row, (images, keypoints) in enumerate(rows):
            top = (2 * sequence + row) * tile
            for step in range(length):
                colour = OBSERVED_COLOUR if step < num_observed else PREDICTED_COLOUR
                left = step * tile
                canvas[top : top + tile - 2, left : left + tile - 2] = _with_border(images[sequence, step], colour, border)
                if keypoints is None:
                    continue
                points = keypoints[sequence, step].detach().float().cpu().numpy()
                if palette is None:
                    palette = plt.cm.hsv(np.linspace(0, 1, len(points), endpoint=False))
                columns, pixel_rows = keypoints_to_pixels(points, size)
                xs.append(columns + left + border)
                ys.append(pixel_rows + top + border)
                rgba = palette.copy()
                rgba[:, 3] = np.clip(points[:, 2] / max(float(points[:, 2].max()), 1e-6), 0.1, 1.0)
                colours.append(rgba)
    height, width = canvas.shape[:2]
    figure = plt.figure(figsize=(width / 50, height / 50 + (0.3 if title else 0)), dpi=100)
    axis = figure.add_axes((0, 0, 1, height / (height + (15 if title else 0))))
    axis.imshow(canvas, interpolation="nearest")
    if xs:
        axis.scatter(
            np.concatenate(xs), np.concatenate(ys), s=16, c=np.concatenate(colours), edgecolors="black", linewidths=0.3
        )
    axis.set_xlim(-0.5, width - 0.5)
    axis.set_ylim(height - 0.5, -0.5)
    axis.axis("off")
    if title:
        figure.suptitle(f"{title}  (rows: real + detected keypoints, model + predicted; green observed, red predicted)",
                        fontsize=7, y=0.995)  # fmt: skip
    atomic_write(Path(path), lambda temp: figure.savefig(temp, format="png"))
    plt.close(figure)


def video_frames(
    real_frames: Tensor,
    model_frames: Tensor,
    num_observed: int,
    max_sequences: int = 6,
    scale: int = 2,
    border: int = 2,
) -> np.ndarray:
    """The GIF's frames (T, H', W', 3) uint8: one row per sequence, real | model side by side."""
    num_sequences = min(max_sequences, real_frames.shape[0])
    real = _to_uint8_hwc(real_frames[:num_sequences])
    model = _to_uint8_hwc(model_frames[:num_sequences])
    if scale > 1:  # nearest-neighbour upscaling: 64x64 is tiny in a viewer
        real = real.repeat(scale, axis=-3).repeat(scale, axis=-2)
        model = model.repeat(scale, axis=-3).repeat(scale, axis=-2)
    gap = np.full((real.shape[-3] + 2 * border, 4, 3), 255, np.uint8)
    frames = []
    for step in range(real.shape[1]):
        colour = OBSERVED_COLOUR if step < num_observed else PREDICTED_COLOUR
        rows = []
        for sequence in range(num_sequences):
            pair = [
                _with_border(real[sequence, step], colour, border),
                gap,
                _with_border(model[sequence, step], colour, border),
            ]
            rows.append(np.concatenate(pair, axis=1))
            rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
        frames.append(np.concatenate(rows[:-1], axis=0))
    return np.stack(frames)


def save_prediction_gif(
    path: Path,
    real_frames: Tensor,
    model_frames: Tensor,
    num_observed: int,
    max_sequences: int = 6,
    seconds_per_frame: float = 0.25,
) -> None:
    """Write the real-beside-predicted GIF; frames (B, T, 3, H, W) in [0, 1]."""
    import imageio.v2 as imageio

    frames = video_frames(real_frames, model_frames, num_observed, max_sequences)
    atomic_write(
        Path(path),
        lambda temp: imageio.mimsave(
            temp, list(frames), format="GIF", duration=seconds_per_frame, loop=0
        ),
    )
