"""Loss terms of section 4 (S1.2, eq. 5) as pure functions; every result is a float32 scalar.

Normalisations follow the original code (google-research/video_structure), the one Table S1's weights
were tuned with: reconstruction errors are ``0.5 * sum of squares`` per frame (tf.nn.l2_loss) averaged over
batch and time; the KL is summed over latent dimensions and averaged over batch and time; the separation
loss is normalised by K(K-1) to lie in [0, 1]; the sparsity penalty is the mean of |mu| over keypoints.
"""

from __future__ import annotations

import torch
from torch import Tensor


def image_loss(reconstruction: Tensor, target: Tensor, frame_weights: Tensor | None = None) -> Tensor:
    """L_image: 0.5 * squared error summed over a frame's pixels and channels, mean over frames.

    reconstruction, target: (N, 3, H, W) (any float dtype; computed in float32); frame_weights (N,) or None:
    each frame's error multiplied by its weight before the mean.
    """
    error = reconstruction.float() - target.float()
    per_frame = 0.5 * error.square().sum((1, 2, 3))  # (N,)
    return (per_frame if frame_weights is None else per_frame * frame_weights).mean()


def relative_image_weights(images: Tensor, floor: float = 0.1) -> Tensor:
    """Per-sequence weights of ``image_loss`` that measure each sequence against copying its first frame.

    images: (B, T, 3, H, W). A sequence's copy error is its frames' mean squared change from frame 0; its weight
    is 1 / max(copy error, ``floor`` x the batch's mean copy error), normalised to mean 1 over the batch (so the
    loss keeps its scale) -> (B,), without gradient. The floor keeps a sequence where nothing moves from taking
    the whole batch.
    """
    with torch.no_grad():
        images = images.float()
        change = (images - images[:, :1]).square().sum((2, 3, 4)).mean(1)  # (B,)
        weights = 1.0 / change.clamp_min(floor * change.mean().clamp_min(1e-12))
        return weights / weights.mean()


def separation_loss(coordinates: Tensor, sigma: float) -> Tensor:
    """L_sep (eq. 5): penalises keypoints whose (time-centred) trajectories overlap.

    coordinates: (B, T, K, 2) keypoint positions over time.
    d_kk' = 1/T sum_t ||(x_tk - <x_k>) - (x_tk' - <x_k'>)||^2;  L = sum_{k != k'} exp(-d_kk' / (2 sigma^2)),
    averaged over the batch and divided by K(K-1): 0 for trajectories infinitely apart, 1 if all identical.
    """
    with torch.autocast(coordinates.device.type, enabled=False):
        c = coordinates.float()
        c = c - c.mean(1, keepdim=True)  # centre each trajectory in time: (B, T, K, 2)
        num_keypoints = c.shape[2]
        # ||c_k - c_k'||^2 = |c_k|^2 + |c_k'|^2 - 2 c_k.c_k', averaged over time: (B, K, K)
        gram = torch.einsum("btkc,btjc->bkj", c, c) / c.shape[1]
        norms = torch.diagonal(gram, dim1=-2, dim2=-1)  # (B, K)
        d = (norms[:, :, None] + norms[:, None, :] - 2 * gram).clamp_min(0.0)
        overlap = torch.exp(-d / (2 * sigma**2)).mean(0)  # (K, K), mean over the batch
        return (overlap.sum() - overlap.diagonal().sum()) / (num_keypoints * (num_keypoints - 1))


def acceleration_loss(coordinates: Tensor) -> Tensor:
    """A temporal prior on keypoints: the mean over keypoints and steps of the squared second difference
    ||x_{t+1} - 2 x_t + x_{t-1}||^2 of the positions (B, T, K, 2). Steady motion costs nothing, so objects are
    still tracked; a keypoint that jumps to a similar-looking part and back pays for the spike twice
    (docs/DESIGN.md, section 3.3; measurements: docs/VISION.md). 0 for fewer than 3 frames."""
    if coordinates.shape[1] < 3:
        return coordinates.new_zeros((), dtype=torch.float32)
    with torch.autocast(coordinates.device.type, enabled=False):
        c = coordinates.float()
        second_difference = c[:, 2:] - 2.0 * c[:, 1:-1] + c[:, :-2]  # (B, T-2, K, 2)
        return second_difference.square().sum(-1).mean()


def sparsity_loss(mu: Tensor) -> Tensor:
    """L_sparse: L1 of the keypoint presences, mean over keypoints and frames. mu: (..., K)."""
    return mu.float().abs().mean()


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(N(mean_q, std_q^2) || N(mean_p, std_p^2)) summed over the last dim: (..., Z) -> (...)."""
    with torch.autocast(mean_q.device.type, enabled=False):
        mean_q, std_q, mean_p, std_p = (t.float() for t in (mean_q, std_q, mean_p, std_p))
        var_ratio = (std_q / std_p).square()
        kl = 0.5 * (var_ratio + ((mean_q - mean_p) / std_p).square() - 1.0 - var_ratio.log())
        return kl.sum(-1)


def keypoint_error(prediction: Tensor, target: Tensor, error: str = "squared") -> Tensor:
    """Per-step error summed over the last axis (F): 0.5 * squared error (a Gaussian decoder, the paper) or
    the absolute error (a Laplace decoder: its optimum is the conditional median, which holds still
    where keypoints now and then jump, instead of the mean, which moves half way). (..., F) -> (...)."""
    difference = prediction.float() - target.float()
    if error == "squared":
        return 0.5 * difference.square().sum(-1)
    if error == "absolute":
        return difference.abs().sum(-1)
    raise ValueError(f"unknown keypoint error {error!r}: choose 'squared' or 'absolute'")


def keypoint_loss(prediction: Tensor, target: Tensor, error: str = "squared") -> Tensor:
    """Keypoint reconstruction error of L_VRNN and L_future: ``keypoint_error`` summed over the K*3
    features of a step, mean over batch and steps. prediction, target: (B, T, F); zero if T == 0."""
    if prediction.shape[1] == 0:
        return prediction.new_zeros((), dtype=torch.float32)
    return keypoint_error(prediction, target, error).mean()
