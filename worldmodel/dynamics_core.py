"""The one interface every dynamics core implements (VRNN, SRVP, hierarchical VRNN; docs/DYNAMICS.md).

A core consumes normalised keypoints x_t (B, F) (F = K*3, or the CNN features of ``cnn-vrnn``) and
zero-padded actions, one frame at a time:

    out = core.observe_step(carry, a_{t-1}, x_t)   # posterior: frame t was seen
    out = core.imagine_step(carry, a_{t-1})        # prior: frame t is imagined
    out.carry        the core's own NamedTuple of (B, ...) tensors after frame t
    out.prediction   x^_t (B, F), the decoded keypoints of frame t
    out.hidden       (B, hidden_size), the vector exposed to reward predictors and agents

Action order (the same for every core): the state that predicts frame t has seen a_{t-1}, the action that
produced frame t, and nothing later. ``carry=None`` starts a sequence. Every random draw is a standard
normal block of ``noise_size`` numbers per sample; callers that keep their own streams (the imagination
envs: one seeded generator per sub-env) pass it as ``noise`` (N, B, noise_size) instead of a generator.

``unroll`` is nothing but a loop over the two steps (plus scheduled sampling where a core feeds its own
predictions back), so a hand-written loop reproduces it exactly. ``losses`` turns an unroll into the
typed loss terms. Code outside ``worldmodel/`` (training, hidden states, envs) only uses this class.

Training asks ``unroll`` for a ``deferred_readout``: where the next step does not read an observed frame's
decoded keypoints (the detected ones are fed back), a core's observe step splits into the part the recurrence
needs (the state and the latent sample) and its read-out (the decoded keypoints and the KL terms), which is
row by row and so runs after the loop on all observed frames at once: the same numbers (to float rounding),
from fewer and larger operations (docs/DYNAMICS.md, "Speed").
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from worldmodel.config import ModelConfig
from worldmodel.losses import keypoint_loss
from worldmodel.precision import dynamics_autocast

CoreCarry = tuple[Tensor, ...]  # each core's NamedTuple of tensors with the batch first


class Step(NamedTuple):
    """One frame through a core."""

    carry: CoreCarry  # after this frame
    prediction: Tensor  # (B, F) decoded keypoints x^_t, normalised
    hidden: Tensor  # (B, H) the hidden state that predicts this frame
    kl: Tensor  # (B, L) the core's KL terms for this frame (zero on imagined frames)
    regulariser: Tensor  # (B,) the core's own penalty for this frame (zero where it has none)


class DeferredObserve(NamedTuple):
    """An observe step without its read-out (``DynamicsCore.observe_deferred``)."""

    carry: CoreCarry  # after this frame
    hidden: Tensor  # (B, H) the hidden state that predicts this frame
    readout: tuple[Tensor | None, ...]  # the core's own NamedTuple of (B, ...) tensors its read-out needs


class Randomness(NamedTuple):
    """Every random draw of one training unroll, made before it (``DynamicsCore.draw_randomness``), so that the
    unroll itself is a fixed computation that ``torch.compile`` can capture whole."""

    noise: tuple[Tensor, ...]  # per frame: (N_t, B, noise_size) standard normals
    feed_target: tuple[Tensor | None, ...]  # per frame: (B, 1) bool, scheduled sampling feeds the target; None: no coin


class Sampling(NamedTuple):
    """How a step draws its latent: ``num_samples`` candidates (the best against a target is kept), drawn from
    ``generator``, or the given standard-normal ``noise`` (N, B, noise_size) instead."""

    num_samples: int = 1
    generator: torch.Generator | None = None
    noise: Tensor | None = None

    def draws(self, batch: int, size: int, like: Tensor, target: Tensor | None) -> Tensor:
        """The given noise, else standard normal draws (N, B, size) on ``like``'s device and dtype: ``num_samples``
        candidates when there is a target to choose by, one without."""
        if self.noise is not None:
            return self.noise
        count = self.num_samples if target is not None else 1
        return torch.randn((count, batch, size), generator=self.generator, device=like.device, dtype=like.dtype)


class Unroll(NamedTuple):
    keypoints: Tensor  # (B, T, F) decoded keypoints x^_t of the chosen samples, normalised
    hidden: Tensor  # (B, T, H) the state that predicts frame t
    kl: Tensor  # (B, T_observed) the KL terms summed, per observed frame
    kl_terms: Tensor  # (B, T_observed, L) each KL term per observed frame
    regulariser: Tensor  # (B, T) the core's own penalty per frame
    final: CoreCarry  # after the last frame


class DynamicsLosses(NamedTuple):
    """Float32 scalars, except ``kl_terms``."""

    total: Tensor  # keypoint + beta * kl_scale * kl + future + weight * regulariser
    keypoint: Tensor  # keypoint reconstruction error, observed frames
    future: Tensor  # keypoint reconstruction error, imagined frames
    kl: Tensor  # the KL terms summed (mean over batch and observed frames), unscaled
    kl_terms: Tensor  # (L,) each KL term (``DynamicsCore.kl_names``), same averaging
    regulariser: Tensor  # the core's own penalty (mean over batch and frames), unweighted


class DynamicsCore(nn.Module):
    """Base of the cores: the shared ``unroll`` and ``losses``; subclasses fill in the steps.

    Attributes a core sets: ``hidden_size`` (H), ``hidden_bound`` (|hidden| <= bound; inf when unbounded),
    ``noise_size`` (standard normals per sample and step), ``best_of`` (samples per step for best of many in
    training and filtering; 1 = none), ``posterior_in_training`` (train on the posterior at every frame of
    the window instead of the prior after the observed frames), ``scheduled_sampling`` (the core feeds its
    own predicted keypoints back, so teacher forcing applies), ``kl_names`` (its KL terms, in order) and
    ``regulariser_weight``.
    """

    hidden_size: int
    hidden_bound: float
    noise_size: int
    best_of: int
    posterior_in_training: bool
    scheduled_sampling: bool
    kl_names: tuple[str, ...]
    regulariser_weight: float

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    # ---- what each core implements --------------------------------------------------------------
    def initial_carry(self, batch_size: int, device: torch.device) -> CoreCarry:
        """A zero carry of the right shapes (to allocate buffers); a sequence starts with ``carry=None``."""
        raise NotImplementedError

    def observe_step(
        self,
        carry: CoreCarry | None,
        action: Tensor,
        target: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Step:
        """Frame t seen: carry after frame t-1 (None: t is the first frame), action (B, A) = a_{t-1}, target
        (B, F) its normalised detected keypoints; best of ``num_samples`` posterior samples against it."""
        return self._observe(carry, action, target, Sampling(num_samples, generator, noise))

    def imagine_step(
        self,
        carry: CoreCarry | None,
        action: Tensor,
        target: Tensor | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Step:
        """Frame t imagined with the prior; with a target (B, F) (evaluation, training) the best of
        ``num_samples`` prior samples is kept, without it the first."""
        return self._imagine(carry, action, target, Sampling(num_samples, generator, noise))

    # What each core implements for the two steps above (their arguments gathered in one Sampling).
    def _observe(self, carry: CoreCarry | None, action: Tensor, target: Tensor, sampling: Sampling) -> Step:
        raise NotImplementedError

    def _imagine(self, carry: CoreCarry | None, action: Tensor, target: Tensor | None, sampling: Sampling) -> Step:
        raise NotImplementedError

    def hidden_state(self, carry: CoreCarry) -> Tensor:
        """(B, H): the vector this core exposes for the frame the carry stands at."""
        raise NotImplementedError

    def defers_readout(self) -> bool:
        """Whether ``observe_deferred`` applies: nothing in the next step reads an observed frame's read-out."""
        return False

    def observe_deferred(
        self, carry: CoreCarry | None, action: Tensor, target: Tensor, sampling: Sampling
    ) -> DeferredObserve:
        """``observe_step`` up to the read-out: the carry and hidden state it returns, and the inputs of
        ``readout``, which gives its prediction and KL terms (where ``defers_readout``)."""
        raise NotImplementedError(f"{type(self).__name__} does not defer its read-out")

    def readout(self, inputs: tuple[Tensor | None, ...]) -> tuple[Tensor, Tensor]:
        """An observe step's read-out from ``DeferredObserve.readout`` of N rows (any number of frames'
        batches concatenated): -> prediction (N, F), KL terms (N, L)."""
        raise NotImplementedError(f"{type(self).__name__} does not defer its read-out")

    def keypoints(self, carry: CoreCarry) -> Tensor:
        """(B, F): the normalised keypoints of the frame the carry stands at (decoded or fed back)."""
        raise NotImplementedError

    def residual_base(self, carry: CoreCarry | None) -> Tensor | None:
        """What a decoder's output is added to with ``residual_keypoints``: the keypoints fed in for the
        previous frame; None without it, and at a sequence start (no previous frame)."""
        return self.keypoints(carry) if self.config.residual_keypoints and carry is not None else None

    def feed(self, carry: CoreCarry, keypoints: Tensor) -> CoreCarry:
        """Scheduled sampling: the carry with ``keypoints`` (B, F) as the frame fed to the next step."""
        raise NotImplementedError(f"{type(self).__name__} does not feed keypoints back")

    # ---- shared -------------------------------------------------------------------------------------
    def unroll(
        self,
        actions: Tensor,
        targets: Tensor | None = None,
        initial: CoreCarry | None = None,
        num_observed: int = 0,
        num_samples: int = 1,
        teacher_forcing: tuple[float, float] = (0.0, 0.0),
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        imagined_samples: int | None = None,
        deferred_readout: bool = False,
        randomness: Randomness | None = None,
        compiled: bool = False,
    ) -> Unroll:
        """Run T frames: ``observe_step`` for the first ``num_observed``, ``imagine_step`` after.

        actions: (B, T, A), row t = a_{t-1}, the action that produced frame t (unused for the first frame of
            a sequence, ``initial=None``). targets: (B, T, F) normalised detected keypoints or None.
        teacher_forcing: (observed, imagined) probability that the frame fed to the next step is the
            target rather than the prediction (scheduled sampling), drawn per batch row and frame; only for
            cores with ``scheduled_sampling``; observed frames of a core that feeds the detected keypoints
            (``feed_detected``) always feed them. noise: (T, N, B, noise_size) draws instead of the
            generator's. imagined_samples: best of many on the imagined frames (default ``num_samples``).
        Runs in float32, also under the convolutions' autocast, except inside a training step whose
        ``Compute.dynamics_training`` chose bf16 (``worldmodel.precision.dynamics_autocast``): then the products
        run in bf16, and the outputs are returned in float32 all the same.
        """
        if compiled and randomness is None:
            raise ValueError("a compiled unroll needs its draws made beforehand: pass randomness=draw_randomness(...)")
        with dynamics_autocast(actions.device.type):
            actions = actions.float()
            targets = None if targets is None else targets.float()
            if num_observed > 0 and targets is None:
                raise ValueError("observed steps need target keypoints")
            loop = compiled_loop(self) if compiled else self._loop
            if randomness is not None:  # it replaces these; constants keep the compiled loop from recompiling
                teacher_forcing, generator, noise = (0.0, 0.0), None, None
            return loop(actions, targets, initial, num_observed, num_samples, teacher_forcing, generator, noise,
                        imagined_samples, deferred_readout and self.defers_readout(), randomness)

    def _loop(
        self,
        actions: Tensor,
        targets: Tensor | None,
        initial: CoreCarry | None,
        num_observed: int,
        num_samples: int,
        teacher_forcing: tuple[float, float],
        generator: torch.Generator | None,
        noise: Tensor | None,
        imagined_samples: int | None,
        defer: bool,
        randomness: Randomness | None,
    ) -> Unroll:
        """``unroll``'s loop over the frames (its arguments as there; ``defer``: read out after the loop)."""
        batch, steps = actions.shape[:2]
        carry = initial
        predictions: list[Tensor | None] = []
        hiddens, kls, regularisers, readouts = [], [], [], []
        for t in range(steps):
            target = None if targets is None else targets[:, t]  # (B, F)
            if randomness is not None:
                step_noise: Tensor | None = randomness.noise[t]
            else:
                step_noise = None if noise is None else noise[t]
            observed = t < num_observed
            if observed and defer:
                assert target is not None
                sampling = Sampling(num_samples, generator, step_noise)
                deferred = self.observe_deferred(carry, actions[:, t], target, sampling)
                carry = deferred.carry
                readouts.append(deferred.readout)
                predictions.append(None)  # filled in after the loop
                hiddens.append(deferred.hidden)
                regularisers.append(deferred.hidden.new_zeros(batch))
                continue  # the detected keypoints are fed: no scheduled sampling on this frame
            if observed:
                assert target is not None
                out = self.observe_step(carry, actions[:, t], target, num_samples, generator, step_noise)
                kls.append(out.kl)
            else:
                samples = num_samples if imagined_samples is None else imagined_samples
                out = self.imagine_step(carry, actions[:, t], target, samples, generator, step_noise)
            carry = out.carry
            if randomness is not None:
                feed_target = randomness.feed_target[t]
            else:
                feed_target = self.feed_mask(observed, target is not None, teacher_forcing, batch, generator,
                                             actions.device)
            if feed_target is not None:
                assert target is not None
                carry = self.feed(carry, torch.where(feed_target, target, out.prediction))
            predictions.append(out.prediction)
            hiddens.append(out.hidden)
            regularisers.append(out.regulariser)
        if readouts:  # all observed frames' read-outs as one batch of (frames * B) rows
            decoded, frame_kls = self.readout(concatenate_rows(readouts))
            predictions[: len(readouts)] = list(decoded.split(batch))
            kls = list(frame_kls.split(batch))
        terms = torch.stack(kls, dim=1) if kls else actions.new_zeros(batch, 0, len(self.kl_names))
        assert carry is not None
        terms = terms.float()
        return Unroll(
            keypoints=torch.stack(predictions, dim=1).float(),  # type: ignore[arg-type]  # (B, T, F)
            hidden=torch.stack(hiddens, dim=1).float(),  # (B, T, H)
            kl=terms.sum(-1),  # (B, T_observed)
            kl_terms=terms,  # (B, T_observed, L)
            regulariser=torch.stack(regularisers, dim=1).float(),  # (B, T)
            final=carry,
        )

    def feed_mask(
        self,
        observed: bool,
        has_target: bool,
        teacher_forcing: tuple[float, float],
        batch: int,
        generator: torch.Generator | None,
        device: torch.device | str,
    ) -> Tensor | None:
        """Scheduled sampling after a frame: (B, 1) bool, the rows that feed the target to the next step (a coin
        per row, drawn from ``generator``), or None where no coin is drawn: a core that does not feed its
        predictions back, no target, a probability of 0, or an observed frame whose detected keypoints are fed
        already (``feed_detected``)."""
        p_target = teacher_forcing[0] if observed else teacher_forcing[1]
        fed_already = observed and self.config.feed_detected
        if not (self.scheduled_sampling and has_target and p_target > 0.0 and not fed_already):
            return None
        return torch.rand((batch, 1), generator=generator, device=device) < p_target

    def draw_randomness(
        self,
        batch: int,
        steps: int,
        num_observed: int,
        num_samples: int,
        teacher_forcing: tuple[float, float],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        imagined_samples: int | None = None,
    ) -> Randomness:
        """The draws of a training unroll with targets on every frame (float32 dynamics), in the order the unroll
        makes them from ``generator``: per frame the latent noise, then the scheduled-sampling coin."""
        noise: list[Tensor] = []
        feed_target: list[Tensor | None] = []
        for t in range(steps):
            observed = t < num_observed
            count = num_samples if observed or imagined_samples is None else imagined_samples
            noise.append(torch.randn((count, batch, self.noise_size), generator=generator, device=device))
            feed_target.append(self.feed_mask(observed, True, teacher_forcing, batch, generator, device))
        return Randomness(tuple(noise), tuple(feed_target))

    def losses(self, unroll: Unroll, targets: Tensor, num_observed: int, kl_scale: float) -> DynamicsLosses:
        """The loss terms of an unroll against its normalised targets (B, T, F); ``kl_scale`` multiplies beta."""
        n = num_observed
        error = self.config.keypoint_error
        keypoint = keypoint_loss(unroll.keypoints[:, :n], targets[:, :n], error)
        future = keypoint_loss(unroll.keypoints[:, n:], targets[:, n:], error)
        zero = keypoint.new_zeros(())
        kl = unroll.kl.mean() if unroll.kl.numel() else zero
        terms = unroll.kl_terms.mean((0, 1)) if unroll.kl_terms.numel() else keypoint.new_zeros(len(self.kl_names))
        total = keypoint + self.config.kl_weight * kl_scale * kl + future
        regulariser = unroll.regulariser.mean() if unroll.regulariser.numel() else zero
        if self.regulariser_weight > 0:
            total = total + self.regulariser_weight * regulariser
        return DynamicsLosses(total, keypoint, future, kl, terms, regulariser)


_COMPILED: weakref.WeakKeyDictionary[DynamicsCore, Callable[..., Unroll]] = weakref.WeakKeyDictionary()


def compiled_loop(core: DynamicsCore) -> Callable[..., Unroll]:
    """``core._loop`` through ``torch.compile``, made once per core (kept apart from the module's state)."""
    if core not in _COMPILED:
        _COMPILED[core] = torch.compile(core._loop)
    return _COMPILED[core]


def concatenate_rows(readouts: list[tuple[Tensor | None, ...]]) -> tuple[Tensor | None, ...]:
    """Frames' read-out inputs (each a NamedTuple of (B, ...) tensors) -> one of (frames * B, ...), frame by
    frame. A field that is None on some frames (the residual base before the first frame) is zero there."""
    fields = []
    for values in zip(*readouts):
        present = [v for v in values if v is not None]
        if not present:
            fields.append(None)
            continue
        fields.append(torch.cat([torch.zeros_like(present[0]) if v is None else v for v in values]))
    return type(readouts[0])(*fields)


def make_dynamics(config: ModelConfig) -> DynamicsCore:
    """The core ``config.dynamics`` names."""
    # The cores import this module for the interface they implement; importing them at call time breaks the cycle.
    from worldmodel.dynamics import VRNN
    from worldmodel.hvrnn import HierarchicalVRNN
    from worldmodel.srvp import SRVP

    cores: dict[str, type[DynamicsCore]] = {"vrnn": VRNN, "srvp": SRVP, "hvrnn": HierarchicalVRNN}
    return cores[config.dynamics](config)
