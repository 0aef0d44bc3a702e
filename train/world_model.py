"""Train one action-conditional Struct-VRNN world model on the DMC data of all six tasks.

    python train/world_model.py                          # profile: paper on CUDA, cpu otherwise
    python train/world_model.py --profile cpu --data data/quick --out runs/cpu
    python train/world_model.py --profile smoke --data /tmp/tiny --out /tmp/run    # seconds
    torchrun --nproc-per-node 2 train/world_model.py --profile cpu ...            # DDP (gloo / nccl)
    python train/world_model.py --resume --out runs/cpu ...                       # continue a killed run
    python train/world_model.py --help                                            # every option

The run directory (--out) receives checkpoint.pt (what downstream code loads with
worldmodel.checkpoint.load_world_model), metrics.jsonl and tensorboard/ (losses, collapse diagnostics,
evaluations), keypoints.pt (staged mode's keypoint cache), pictures/ (a keypoint PNG and a
real-vs-predicted GIF per evaluation; the last ones also as keypoints.png / prediction.gif) and
summary.json (final evaluation, per-stage wall time, final losses).

Reading order: parse and check the config; set up processes, device and seeds; build the model (or
restore it); then the stages, each one plain loop: schedule -> batch -> step -> log / evaluate /
checkpoint. Joint mode has one stage; staged mode has vision -> keypoints -> dynamics (SPEC section 4).
Bad input (worldmodel.errors.InputError) ends with a one-line error and exit code 2, before anything is
written; rerunning a run that already finished does nothing and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as `python train/world_model.py` without installing
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import tyro  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from worldmodel import distributed, storage  # noqa: E402
from worldmodel.atomic import atomic_write, atomic_write_text  # noqa: E402
from worldmodel.checkpoint import (  # noqa: E402
    CHECKPOINT_FILE,
    CheckpointError,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_rng,
)
from worldmodel.errors import InputError, report  # noqa: E402
from worldmodel.evaluation import EvalSet, evaluate, evaluate_reconstruction, load_eval_set  # noqa: E402
from worldmodel.logger import RunLogger  # noqa: E402
from worldmodel.config import STATE_VARIANT  # noqa: E402
from worldmodel.model import WorldModel  # noqa: E402
from worldmodel.tasks import parse_tasks  # noqa: E402
from worldmodel.dynamics_benchmark import PREDICTIONS, REFERENCES, choose_window_starts, horizon_errors, keypoint_stability, open_loop  # noqa: E402
from worldmodel.precision import announce, autocast, choose_compute  # noqa: E402
from worldmodel.state_bound import dataset_state_dims, per_feature_points, state_model_config, state_split  # noqa: E402
from worldmodel.training import (  # noqa: E402
    KEYPOINT_CACHE_FILE,
    PROFILES,
    KeypointSplit,
    Objective,
    ResumableBatchSampler,
    Stage,
    TrainConfig,
    config_differences,
    config_to_dict,
    detect_split,
    freeze_for_stage,
    learning_rate_at,
    load_keypoint_cache,
    make_optimizer,
    profile_config,
    save_keypoint_cache,
    schedule_at,
    seeded_loader,
    set_learning_rate,
    stage_steps,
    train_step,
    validate,
    vision_fingerprint,
)
from worldmodel.visualize import save_keypoint_png, save_prediction_gif  # noqa: E402

SUMMARY_FILE = "summary.json"
PICTURES_DIR = "pictures"


# ----------------------------------------------------------------------------------------------
# Config: the profile supplies defaults, explicit options override them
# ----------------------------------------------------------------------------------------------
def parse_config(argv: list[str]) -> TrainConfig:
    """Parse once for --profile, then parse everything with that profile's TrainConfig as the defaults."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--profile", choices=PROFILES, default=None)
    known, _ = early.parse_known_args(argv)
    profile = known.profile or ("paper" if torch.cuda.is_available() else "cpu")
    if any(arg == "--net.variant" or arg.startswith("--net.variant=") for arg in argv):
        raise InputError("give the model variant with --model, not --net.variant")
    defaults = dataclasses.replace(profile_config(profile), profile=profile)
    description = (__doc__ or "").split("\n\n")[0]
    return tyro.cli(TrainConfig, args=argv, default=defaults, description=description)


def check_dataset(config: TrainConfig, tasks: list[str]) -> dict[str, Any]:
    """Every task's train and test file must exist, be intact and hold windows of the run's length; returns
    the dataset record stored in checkpoints."""
    if not config.data.is_dir():
        raise InputError(f"no dataset folder {config.data}; run `python collect/dmcs.py --out {config.data}` first")
    action_repeats = {}
    length = max(config.window, config.vision_span) if config.mode == "staged" else config.window
    for task in tasks:
        infos = [storage.checked_dataset(config.data, task, split) for split in storage.SPLITS]  # else InputError
        for info in infos:
            if info.episode_steps < length:
                raise InputError(
                    f"episodes of {info.path} have {info.episode_steps} steps, shorter than a training window of "
                    f"{length}; collect longer episodes (collect/dmcs.py --episode-steps) or shorten the window "
                    "(--num-observed, --num-predicted, --vision-window)"
                )
        if len({info.action_repeat for info in infos}) > 1:
            raise InputError(
                f"the train and test files of {task} in {config.data} were collected with different action repeats; "
                "collect both splits with the same collect/dmcs.py command"
            )
        action_repeats[task] = infos[0].action_repeat
    return {"path": str(config.data.resolve()), "tasks": tasks, "action_repeats": action_repeats}


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def frame_batches(
    config: TrainConfig, tasks: list[str], length: int, global_batch: int, start_step: int,
    dist: distributed.DistInfo, salt: int, frame_stride: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(frames uint8 (B, L', 64, 64, 3), actions (B, L', 6)) on the device, from DataLoader workers;
    windows of ``length`` consecutive steps, every ``frame_stride``-th kept (actions are then only
    meaningful for stride 1: the vision stage ignores them)."""
    from worldmodel.data import WindowDataset

    dataset = WindowDataset(config.data, tasks, "train", length=length)
    sampler = ResumableBatchSampler(
        len(dataset), global_batch, config.seed + salt, start_step, dist.rank, dist.world_size
    )
    pin = dist.device.type == "cuda"
    for window in seeded_loader(dataset, sampler, config.num_workers, config.seed, pin):
        frames, actions = window.frames[:, ::frame_stride], window.actions[:, ::frame_stride]
        yield frames.to(dist.device, non_blocking=pin), actions.to(dist.device, non_blocking=pin)


def keypoint_batches(
    split: KeypointSplit, config: TrainConfig, start_step: int, dist: distributed.DistInfo
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(keypoints (B, L, K, 3), actions (B, L, 6)) gathered from the in-memory cache: no DataLoader."""
    starts = split.window_starts(config.window)
    sampler = ResumableBatchSampler(
        len(starts), config.batch_size, config.seed + 2, start_step, dist.rank, dist.world_size
    )
    keypoints, actions = split.keypoints.to(dist.device), split.actions.to(dist.device)
    offsets = torch.arange(config.window, device=dist.device)
    starts = starts.to(dist.device)
    for indices in sampler:
        rows = starts[torch.tensor(indices, device=dist.device)][:, None] + offsets
        yield keypoints[rows], actions[rows]


# ----------------------------------------------------------------------------------------------
# Evaluation and pictures (rank 0)
# ----------------------------------------------------------------------------------------------
def run_evaluation(
    model: WorldModel, eval_set: EvalSet, config: TrainConfig, stage: Stage, step: int, global_step: int,
    run_dir: Path, logger: RunLogger, device: torch.device, precision: str, final: bool,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate, log to JSONL/TensorBoard and draw the pictures; returns the metrics."""
    started = time.perf_counter()
    context = lambda: autocast(device, precision)  # noqa: E731
    name = f"{stage}_{step:06d}"
    pictures = run_dir / PICTURES_DIR
    structured = model.config.structured
    if stage == "vision":  # no dynamics yet: score the detector and reconstructor
        result, shown = evaluate_reconstruction(model, eval_set, config.eval_batch_size, device, context)
        metrics: dict[str, Any] = result._asdict()
        real, drawn, detected, predicted = shown.real_frames, shown.reconstructed_frames, shown.detected, shown.detected
    else:
        result, shown = evaluate(
            model, eval_set, config.num_observed, config.eval_samples, config.eval_batch_size,
            config.seed, device, context,
        )  # fmt: skip
        metrics = result._asdict()
        real, drawn, detected, predicted = shown.real_frames, shown.predicted_frames, shown.detected, shown.predicted
    num_observed = config.num_observed if stage != "vision" else real.shape[1]
    # Draw each keypoint as strong as the reconstructor sees it: its Gaussian map's amplitude.
    detected, predicted = (
        torch.cat([points[..., :2], model.amplitude(points)[..., None]], dim=-1) for points in (detected, predicted)
    )
    title = f"{config.model} {stage} step {step}"
    png, gif = pictures / f"keypoints_{name}.png", pictures / f"prediction_{name}.gif"
    save_keypoint_png(
        png, real, drawn, detected if structured else None, predicted if structured else None, num_observed,
        title=title,
    )  # fmt: skip
    save_prediction_gif(gif, real, drawn, num_observed)
    if final:  # the latest stage's last pictures, under fixed names
        for source, target in ((png, run_dir / "keypoints.png"), (gif, run_dir / "prediction.gif")):
            atomic_write(target, lambda temp, source=source: shutil.copyfile(source, temp))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    logger.log("eval", stage, step, global_step, metrics)
    return metrics


def take_vision(model: WorldModel, source: Path, dataset_record: dict[str, Any], run_dir: Path | None) -> None:
    """Load the vision weights of the finished run ``source`` into ``model`` and copy its keypoint cache into
    ``run_dir`` (rank 0; None elsewhere), so that the staged run starts at the keypoint stage."""
    try:
        checkpoint = load_checkpoint(source)
    except CheckpointError as error:
        raise InputError(f"--vision-from: {error}") from None
    if checkpoint["stage"] in ("vision", "joint") and not checkpoint["complete"]:
        raise InputError(f"--vision-from {source}: its vision stage has not finished (resume that run first)")
    theirs = checkpoint["dataset"]
    if (theirs.get("path"), list(theirs.get("tasks", []))) != (dataset_record["path"], dataset_record["tasks"]):
        raise InputError(f"--vision-from {source} was trained on {theirs.get('path')} ({', '.join(theirs.get('tasks', []))}); "
                         f"this run uses {dataset_record['path']} ({', '.join(dataset_record['tasks'])}): give the same --data and --tasks")  # fmt: skip
    own_parts = ("dynamics.", "normalizer.")  # what this run trains and fits itself
    vision = {key: value for key, value in checkpoint["model"].items() if not key.startswith(own_parts)}
    wanted = {key: value.shape for key, value in model.state_dict().items() if not key.startswith(own_parts)}
    if {key: value.shape for key, value in vision.items()} != wanted:
        raise InputError(f"--vision-from {source}: its vision network differs from this one; give the same --model and --net sizes")
    model.load_state_dict(vision, strict=False)
    cache = find_checkpoint(source).parent / KEYPOINT_CACHE_FILE
    if run_dir is not None and cache.is_file():  # else detected again (the fingerprint decides either way)
        atomic_write(run_dir / KEYPOINT_CACHE_FILE, lambda temp: shutil.copyfile(cache, temp))


def dynamics_benchmark(model: WorldModel, test: KeypointSplit, config: TrainConfig) -> dict[str, Any] | None:
    """Open-loop keypoint distance per horizon on the cached test keypoints, beside hold-last and constant
    velocity (worldmodel/dynamics_benchmark.py; downstream/dynamics.py compares runs)."""
    length = config.num_observed + config.num_predicted
    try:
        starts = choose_window_starts(test, length, config.eval_windows * 8, config.seed)
    except ValueError:
        return None
    result = open_loop(model, test, starts, config.num_observed, config.num_predicted, config.eval_samples, config.seed)
    if model.config.reads_states:  # the state-space bound: per-feature error in normalised state units
        result = per_feature_points(result, model.normalizer)
    errors = horizon_errors(result, config.num_observed)
    names = PREDICTIONS + REFERENCES
    return {
        "mean_distance": {name: float(getattr(errors, name).mean()) for name in names},
        "ratio_to_hold_last": {name: errors.ratio_to_hold_last(name) for name in names},
        "per_horizon": {name: getattr(errors, name).tolist() for name in names},
        "num_windows": errors.num_windows,
        "num_samples": errors.num_samples,
        "stability": keypoint_stability(test)._asdict(),
    }


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = parse_config(argv)
        tasks = parse_tasks(config.tasks)
        if config.model == STATE_VARIANT:  # its input size is the data's: read the state sizes first
            dims = dataset_state_dims(config.data, tasks)
            config = dataclasses.replace(config, net=state_model_config(config.net, dims))
        validate(config)
    except (ValueError, OSError) as error:  # InputError, or a ModelConfig check run while parsing
        return report(error)
    try:
        dist = distributed.setup(config.device)
        return train(config, tasks, dist)
    except InputError as error:
        return report(error)
    finally:
        distributed.cleanup()


def train(config: TrainConfig, tasks: list[str], dist: distributed.DistInfo) -> int:
    """The run: resume or start, then the stages (joint, or vision -> keypoints -> dynamics), then the summary."""
    device = dist.device
    try:
        compute = choose_compute(device, config.precision, config.channels_last)
    except ValueError as error:
        raise InputError(str(error)) from None
    precision = compute.precision
    run_dir = config.out
    checkpoint_path = run_dir / CHECKPOINT_FILE
    staged = config.mode == "staged"
    reads_states = config.model_config.reads_states  # the state-space bound: no frame is ever read

    # ---- resume or start (nothing is written before every input has been checked) ------------------
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if config.resume and not checkpoint_path.is_file():
        raise InputError(f"--resume: no checkpoint in {run_dir}; start a new run without --resume")
    checkpoint: dict[str, Any] | None = None
    if checkpoint_path.is_file():
        checkpoint = load_checkpoint(checkpoint_path)  # damaged or foreign: CheckpointError
        differences = config_differences(checkpoint["train_config"], config)
        if checkpoint["complete"] and not differences:  # a rerun of finished work, like the collector's
            if dist.is_main:
                print(f"the run in {run_dir} is already complete: nothing to do ({run_dir / SUMMARY_FILE})")
            return 0
        if checkpoint["complete"]:
            raise InputError(
                f"{run_dir} holds a finished run with other options ({', '.join(differences)}); choose another --out"
            )
        if not config.resume:
            raise InputError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        if differences:
            raise InputError(
                f"--resume with a different config than the run in {run_dir} ({', '.join(differences)}); "
                "give the run's options (see its config.json), or choose another --out"
            )
    dataset_record = check_dataset(config, tasks)
    if checkpoint is not None:
        trained_on = checkpoint["dataset"].get("action_repeats")
        if trained_on != dataset_record["action_repeats"]:
            raise InputError(
                f"--data {config.data} was collected with action repeats {dataset_record['action_repeats']}, the run in "
                f"{run_dir} trained on data with {trained_on}; resume with its dataset ({checkpoint['dataset'].get('path')})"
            )
    distributed.barrier()  # every rank has looked at the run directory before rank 0 writes to it

    # ---- model, seeds ----------------------------------------------------------------------------
    if dist.is_main:  # the inputs are valid: say how the convolutions will run
        announce(compute)  # e.g. "cpu AMD EPYC 7B13 (AVX2), no native bf16 -> fp32, channels_last"
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = compute.prepare(WorldModel(config.model_config).to(device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stage: Stage = "vision" if staged else "joint"
    start_step = 0
    extra: dict[str, Any] = {}
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError:
            raise InputError(f"the weights in {checkpoint_path} do not fit its config; the checkpoint is damaged: "
                             "restore it, or start a new run in another --out") from None
        stage, start_step, extra = checkpoint["stage"], checkpoint["step"], checkpoint["extra"]
        # Every rank continues its own random draws (latent samples, scheduled-sampling coins) where the
        # checkpoint caught them, so the resumed run is the uninterrupted one. With another number of
        # processes than the run had, the batches split differently anyway: rank 0 continues its draws and the
        # others start fresh, seeded streams (close to, not exactly, the uninterrupted run).
        saved_ranks = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
        if len(saved_ranks) == dist.world_size:
            restore_rng_state(saved_ranks[dist.rank])
        else:
            if dist.is_main:
                print(f"warning: the run in {run_dir} used {len(saved_ranks)} process(es), this resume "
                      f"{dist.world_size}: it continues, but not bit for bit", file=sys.stderr)  # fmt: skip
            restore_rng_state(saved_ranks[0])
            if dist.rank > 0:
                torch.manual_seed(config.seed + 1_000_003 * dist.rank + checkpoint["global_step"])
    else:
        if config.vision_from is not None:
            take_vision(model, config.vision_from, dataset_record, run_dir if dist.is_main else None)
            stage = "keypoints"
        if reads_states:  # no vision stage: the stored states are its keypoints
            stage = "keypoints"
        seed_rng(config.seed + 1_000_003 * dist.rank)  # each rank draws its own latent samples
    stage_seconds: dict[str, float] = dict(extra.get("stage_seconds", {}))  # wall time per stage
    final_losses: dict[str, dict[str, float]] = dict(extra.get("final_losses", {}))
    last_eval: dict[str, Any] = dict(extra.get("last_eval", {}))

    def global_step_of(stage_name: str, step: int) -> int:
        """Steps over all stages: the x axis of the logs."""
        if not staged:
            return config.steps if stage_name == "done" else step
        vision = 0 if reads_states else config.vision_steps  # the state-space bound has no vision stage
        offset = {"vision": 0, "keypoints": vision, "dynamics": vision}
        return offset.get(stage_name, vision + config.dynamics_steps) + step

    eval_set = (  # frames: none for the state-space bound (its open-loop error is in the summary)
        load_eval_set(config.data, tasks, config.window, config.eval_windows, config.seed)
        if dist.is_main and not reads_states
        else None
    )
    logger = RunLogger(run_dir, dist.is_main, checkpoint["global_step"] if checkpoint else None)
    if dist.is_main and checkpoint is None:
        atomic_write_text(run_dir / "config.json", json.dumps(config_to_dict(config), indent=2))

    def write_checkpoint(
        stage_name: str, step: int, optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None, complete: bool = False,
    ) -> None:  # fmt: skip
        rng_ranks = distributed.gather_to_main(capture_rng_state())  # a collective: every rank gets here
        if not dist.is_main:
            return
        logger.flush()  # the log is durable up to the checkpoint it will be resumed from
        cache = str(run_dir / KEYPOINT_CACHE_FILE) if staged and not reads_states else None
        save_checkpoint(
            checkpoint_path,
            model_state=model.state_dict(),
            model_config=dataclasses.asdict(config.model_config),
            train_config=config_to_dict(config),
            dataset={**dataset_record, "keypoint_cache": cache},
            stage=stage_name,
            step=step,
            global_step=global_step_of(stage_name, step),
            optimizer_state=None if optimizer is None else optimizer.state_dict(),
            complete=complete,
            rng_ranks=rng_ranks,
            extra={
                "scaler": None if scaler is None or not scaler.is_enabled() else scaler.state_dict(),
                "stage_seconds": stage_seconds,
                "final_losses": final_losses,
                "last_eval": last_eval,
            },
        )

    steps_this_run = 0

    def run_stage(stage_name: Stage, start: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """The training loop of one stage; False if it halted early (--halt-after)."""
        nonlocal steps_this_run, last_eval
        total = stage_steps(config, stage_name)
        parameters = freeze_for_stage(model, stage_name)
        optimizer = make_optimizer(parameters, config, device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        if checkpoint is not None and checkpoint["stage"] == stage_name and checkpoint["optimizer"] is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
            if extra.get("scaler"):
                scaler.load_state_dict(extra["scaler"])
        objective: torch.nn.Module = Objective(model, config.num_observed)
        if dist.is_distributed:
            objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
        if stage_name == "vision":
            items_per_step = config.vision_batch_size * config.vision_window
        else:
            items_per_step = config.batch_size * config.window  # frames (joint) or keypoint frames (dynamics)
        progress = None
        if dist.is_main and config.progress:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=start, desc=stage_name, unit="step", dynamic_ncols=True)
        wall_before, loop_started = stage_seconds.get(stage_name, 0.0), time.perf_counter()
        # steps/s over the steps since the last log line, with evaluation and checkpoint pauses left out
        last_log, paused, steps_since_log = time.perf_counter(), 0.0, 0
        done = start
        for step in range(start, total):
            if config.halt_after is not None and steps_this_run >= config.halt_after:
                write_checkpoint(stage_name, step, optimizer, scaler)
                break
            set_learning_rate(optimizer, learning_rate_at(step, total, config))
            schedule = schedule_at(step, total, config, stage_name)
            inputs, actions = next(batches)
            out = train_step(
                objective, optimizer, scaler, parameters, stage_name, schedule, config, precision, device,
                frames=None if stage_name == "dynamics" else inputs,
                keypoints=inputs if stage_name == "dynamics" else None,
                actions=actions,
            )  # fmt: skip
            done, global_done = step + 1, global_step_of(stage_name, step + 1)
            steps_this_run += 1
            steps_since_log += 1
            if done % config.log_every == 0 or done == total:
                terms = torch.stack([*out.losses, out.grad_norm.float(), out.penalty.float()])
                names = [*out.losses._fields, "grad_norm", "l2_penalty"]
                record: dict[str, Any] = dict(zip(names, distributed.mean_over_ranks(terms).tolist()))  # syncs
                seconds = time.perf_counter() - last_log - paused
                record.update(
                    lr=optimizer.param_groups[0]["lr"],
                    kl_scale=schedule.kl_scale,
                    teacher_forcing_observed=schedule.teacher_forcing_observed,
                    teacher_forcing_predicted=schedule.teacher_forcing_predicted,
                    steps_per_s=steps_since_log / seconds,
                    frames_per_s=steps_since_log * items_per_step * dist.world_size / seconds,
                )
                if out.diagnostics is not None:  # keypoint collapse shows here first (SPEC 8)
                    record.update(out.diagnostics._asdict())
                logger.log("train", stage_name, done, global_done, record)
                final_losses[stage_name] = {name: record[name] for name in out.losses._fields}
                if progress is not None:
                    progress.set_postfix(loss=f"{record['total']:.4g}", steps_s=f"{record['steps_per_s']:.2f}")
                last_log, paused, steps_since_log = time.perf_counter(), 0.0, 0
            if progress is not None:
                progress.update(1)
            pause_started = time.perf_counter()
            if eval_set is not None and (done % config.eval_every == 0 or done == total):
                last_eval = run_evaluation(
                    model, eval_set, config, stage_name, done, global_done, run_dir, logger, device, precision,
                    final=done == total,
                )  # fmt: skip
            stage_seconds[stage_name] = wall_before + time.perf_counter() - loop_started
            if done < total and done % config.checkpoint_every == 0:  # the stage's end is the caller's to save
                write_checkpoint(stage_name, done, optimizer, scaler)
            paused += time.perf_counter() - pause_started
        if progress is not None:
            progress.close()
        return done == total

    def halted() -> int:
        logger.close()
        if dist.is_main:
            print(f"halted after {steps_this_run} steps: continue with --resume --out {run_dir}", file=sys.stderr)
        return 0

    # ---- joint training (the paper) ---------------------------------------------------------------
    if not staged:
        batches = frame_batches(config, tasks, config.window, config.batch_size, start_step, dist, salt=0)
        if not run_stage("joint", start_step, batches):
            return halted()
    else:
        # ---- staged (1): detector + reconstructor on frames -------------------------------------------
        if stage == "vision":
            batches = frame_batches(
                config, tasks, config.vision_span, config.vision_batch_size, start_step, dist, salt=1,
                frame_stride=config.vision_frame_stride,
            )  # fmt: skip
            if not run_stage("vision", start_step, batches):
                return halted()
            write_checkpoint("keypoints", 0)
            stage, start_step = "keypoints", 0

        # ---- staged (2): detect keypoints once for the whole dataset, cache them in the run dir -------
        cache_path = run_dir / KEYPOINT_CACHE_FILE
        if reads_states:  # the state-space bound: the stored states, read afresh (no cache needed)
            splits = {split: state_split(config.data, tasks, split, config.model_config) for split in storage.SPLITS}
        else:
            splits = load_keypoint_cache(cache_path, vision_fingerprint(model))
        if splits is None:  # also on a resume whose cache was lost: detection is deterministic
            started = time.perf_counter()
            model.eval()
            splits = {split: detect_split(model, config.data, tasks, split, device, precision) for split in storage.SPLITS}
            model.train()
            seconds = time.perf_counter() - started
            stage_seconds["keypoints"] = stage_seconds.get("keypoints", 0.0) + seconds
            if dist.is_main:
                save_keypoint_cache(cache_path, splits, vision_fingerprint(model))
                frames = sum(int(split.keypoints.shape[0]) for split in splits.values())
                logger.log("stage", "keypoints", 0, global_step_of("keypoints", 0),
                           {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds})  # fmt: skip
        if stage == "keypoints":
            if config.normalize_keypoints:  # per-feature, within-episode statistics (SPEC 8)
                shortest = int(splits["train"].episode_lengths.min())
                model.fit_keypoint_normalization(splits["train"].sequences(shortest).to(device))
            write_checkpoint("dynamics", 0)
            stage, start_step = "dynamics", 0

        # ---- staged (3): the dynamics on cached keypoints -------------------------------------------------
        if not run_stage("dynamics", start_step, keypoint_batches(splits["train"], config, start_step, dist)):
            return halted()

    # ---- done: final checkpoint and summary -----------------------------------------------------------
    write_checkpoint("done", 0, complete=True)
    if dist.is_main:
        benchmark = dynamics_benchmark(model, splits["test"], config) if staged else None
        summary = {
            "complete": True,
            "profile": config.profile,
            "model": config.model,
            "mode": config.mode,
            "compute": compute.reason,
            "global_steps": global_step_of("done", 0),
            "stage_seconds": {name: round(value, 1) for name, value in stage_seconds.items()},
            "final_losses": final_losses,
            "final_eval": last_eval,
            "dynamics_benchmark": benchmark,
            "dataset": dataset_record,
            "checkpoint": str(checkpoint_path),
            "config": config_to_dict(config),
        }
        atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        logger.log("summary", "done", 0, summary["global_steps"], {"stage_seconds": summary["stage_seconds"]})
    logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
