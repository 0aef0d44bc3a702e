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

Reading order (``train``): parse and check the config, the run directory and the data; build the model,
then start it or restore it from the checkpoint with its TrainState (stage, step, timings, last losses
and evaluation); then one loop over the stages (worldmodel.train_config.Stage) until the run is done. Joint
mode has one stage; staged mode has vision -> keypoints -> dynamics. A stage that trains is one plain
loop (``optimise_stage``): schedule -> batch -> step -> log / evaluate / checkpoint.
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
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as `python train/world_model.py` without installing
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import tyro  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from worldmodel import compilation, distributed, storage  # noqa: E402
from worldmodel.atomic import atomic_write, atomic_write_text  # noqa: E402
from worldmodel.checkpoint import (  # noqa: E402
    CHECKPOINT_FILE,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
    seed_rng,
)
from worldmodel.compilation import CompileDecision, decide_compile  # noqa: E402
from worldmodel.dynamics_benchmark import benchmark_record, choose_window_starts, open_loop  # noqa: E402
from worldmodel.errors import InputError, closed_output, report  # noqa: E402
from worldmodel.run_sources import check_same_data, existing_run, take_run, take_vision  # noqa: E402
from worldmodel.evaluation import EvalSet, evaluate, evaluate_reconstruction, load_eval_set  # noqa: E402
from worldmodel.config import STATE_VARIANT  # noqa: E402
from worldmodel.data import WindowDataset  # noqa: E402
from worldmodel.logger import RunLogger  # noqa: E402
from worldmodel.heap import HeapDecision, keep_freed_memory  # noqa: E402
from worldmodel.model import Schedule, WorldModel  # noqa: E402
from worldmodel.precision import Compute, announce, choose_compute  # noqa: E402
from worldmodel.tasks import parse_tasks  # noqa: E402
from worldmodel.state_bound import dataset_state_dims, per_feature_points, state_model_config, state_split  # noqa: E402
from worldmodel.keypoint_cache import (  # noqa: E402
    KEYPOINT_CACHE_FILE,
    KeypointSplit,
    data_layout,
    load_keypoint_cache,
    save_keypoint_cache,
    vision_fingerprint,
)
from worldmodel.train_config import (  # noqa: E402
    PROFILES,
    Stage,
    TrainConfig,
    config_to_dict,
    profile_config,
    validate,
)
from worldmodel.training import (  # noqa: E402
    Batch,
    Objective,
    ResumableBatchSampler,
    StageOptimizer,
    StepOutput,
    TrainState,
    detect_split,
    learning_rate_at,
    schedule_at,
    seeded_loader,
    train_step,
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
        infos = [storage.checked_dataset_files(config.data, task, split)[0] for split in storage.SPLITS]  # else InputError
        # ([0]: the main file; its parts were checked to share its episode length and action repeat)
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
) -> Iterator[Batch]:  # fmt: skip
    """Frames uint8 (B, L', 64, 64, 3) and actions (B, L', 6) on the device, from DataLoader workers;
    windows of ``length`` consecutive steps, every ``frame_stride``-th kept (actions are then only
    meaningful for stride 1: the vision stage ignores them)."""
    dataset = WindowDataset(config.data, tasks, "train", length=length)
    sampler = ResumableBatchSampler(
        len(dataset), global_batch, config.seed + salt, start_step, dist.rank, dist.world_size
    )
    pin = dist.device.type == "cuda"
    for window in seeded_loader(dataset, sampler, config.num_workers, config.seed, pin):
        frames, actions = window.frames[:, ::frame_stride], window.actions[:, ::frame_stride]
        yield Batch(frames.to(dist.device, non_blocking=pin), actions.to(dist.device, non_blocking=pin))


def keypoint_batches(
    split: KeypointSplit, config: TrainConfig, start_step: int, dist: distributed.DistInfo
) -> Iterator[Batch]:
    """Keypoints (B, L, K, 3) and actions (B, L, 6) gathered from the in-memory cache: no DataLoader."""
    starts = split.window_starts(config.window)
    sampler = ResumableBatchSampler(
        len(starts), config.batch_size, config.seed + 2, start_step, dist.rank, dist.world_size
    )
    keypoints, actions = split.keypoints.to(dist.device), split.actions.to(dist.device)
    offsets = torch.arange(config.window, device=dist.device)
    starts = starts.to(dist.device)
    for indices in sampler:
        rows = starts[torch.tensor(indices, device=dist.device)][:, None] + offsets
        yield Batch(keypoints[rows], actions[rows])


# ----------------------------------------------------------------------------------------------
# Evaluation and pictures (rank 0)
# ----------------------------------------------------------------------------------------------
def run_evaluation(run: Run, state: TrainState, final: bool) -> dict[str, Any]:
    """Evaluate at the state's step, log to JSONL/TensorBoard and draw the pictures; returns the metrics."""
    started = time.perf_counter()
    config, model, eval_set, device = run.config, run.model, run.eval_set, run.dist.device
    assert eval_set is not None
    stage, step = state.stage, state.step
    name = f"{stage.value}_{step:06d}"
    pictures = config.out / PICTURES_DIR
    structured = model.config.structured
    if stage == Stage.VISION:  # no dynamics yet: score the detector and reconstructor
        result, shown = evaluate_reconstruction(model, eval_set, config.eval_batch_size, device, run.compute.autocast)
        metrics: dict[str, Any] = result._asdict()
        real, drawn, detected, predicted = shown.real_frames, shown.reconstructed_frames, shown.detected, shown.detected
    else:
        result, shown = evaluate(
            model, eval_set, config.observed_steps(stage), config.eval_samples, config.eval_batch_size,
            config.seed, device, run.compute.autocast,
        )  # fmt: skip
        metrics = result._asdict()
        real, drawn, detected, predicted = shown.real_frames, shown.predicted_frames, shown.detected, shown.predicted
    # The vision stage's pictures show reconstructions of every frame, each from its own detected keypoints.
    num_observed = config.observed_steps(stage) if stage != Stage.VISION else real.shape[1]
    # Draw each keypoint as strong as the reconstructor sees it: its Gaussian map's amplitude.
    detected, predicted = (
        torch.cat([points[..., :2], model.amplitude(points)[..., None]], dim=-1) for points in (detected, predicted)
    )
    title = f"{config.model} {stage.value} step {step}"
    png, gif = pictures / f"keypoints_{name}.png", pictures / f"prediction_{name}.gif"
    save_keypoint_png(
        png, real, drawn, detected if structured else None, predicted if structured else None, num_observed,
        title=title,
    )  # fmt: skip
    save_prediction_gif(gif, real, drawn, num_observed)
    if final:  # the latest stage's last pictures, under fixed names
        for source, target in ((png, config.out / "keypoints.png"), (gif, config.out / "prediction.gif")):
            atomic_write(target, lambda temp, source=source: shutil.copyfile(source, temp))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    run.logger.log("eval", stage.value, step, state.global_step(config), metrics)
    return metrics


def dynamics_benchmark(model: WorldModel, test: KeypointSplit, config: TrainConfig) -> dict[str, Any] | None:
    """Open-loop keypoint distance per horizon on the cached test keypoints, beside hold-last and constant
    velocity (worldmodel/dynamics_benchmark.py; downstream/dynamics.py compares runs)."""
    try:
        starts = choose_window_starts(test, config.window, config.eval_windows * 8, config.seed)
    except ValueError:
        return None
    result = open_loop(model, test, starts, config.num_observed, config.num_predicted, config.eval_samples, config.seed)
    if model.config.reads_states:  # the state-space bound: per-feature error in normalised state units
        result = per_feature_points(result, model.normalizer)
    keypoints = model.config.structured and not model.config.reads_states  # cnn features and states do not jump
    return benchmark_record(result, config.num_observed, test if keypoints else None)


# ----------------------------------------------------------------------------------------------
# The run's fixed parts, its checkpoint
# ----------------------------------------------------------------------------------------------
class Run(NamedTuple):
    """What every part of a run reads; fixed once the run has started (what changes is the TrainState)."""

    config: TrainConfig
    tasks: list[str]
    dist: distributed.DistInfo
    compute: Compute
    model: WorldModel
    logger: RunLogger
    eval_set: EvalSet | None  # rank 0 evaluates; None elsewhere
    dataset_record: dict[str, Any]  # stored in checkpoints (check_dataset)
    # --compile-dynamics, decided once at the start (worldmodel/compilation.py)
    dynamics_compile: CompileDecision = CompileDecision(False, "dynamics uncompiled")
    heap: HeapDecision = HeapDecision(False, "heap: glibc's defaults")  # --keep-freed-memory (worldmodel/heap.py)


def save(run: Run, state: TrainState, optimizer: StageOptimizer | None = None) -> None:
    """Write the checkpoint (rank 0). A collective: every rank calls it, with the stage's optimizer, or None
    between stages."""
    rng_ranks = distributed.gather_to_main(capture_rng_state())
    if not run.dist.is_main:
        return
    run.logger.flush()  # the log is durable up to the checkpoint it will be resumed from
    staged_on_frames = run.config.mode == "staged" and not run.model.config.reads_states
    cache = str(run.config.out / KEYPOINT_CACHE_FILE) if staged_on_frames else None
    save_checkpoint(
        run.config.out / CHECKPOINT_FILE,
        model_state=run.model.state_dict(),
        model_config=dataclasses.asdict(run.config.model_config),
        train_config=config_to_dict(run.config),
        dataset={**run.dataset_record, "keypoint_cache": cache},
        rng_ranks=rng_ranks,
        **state.checkpoint_fields(run.config, optimizer),
    )


def start(model: WorldModel, config: TrainConfig, dist: distributed.DistInfo, dataset_record: dict[str, Any]) -> TrainState:
    """A new run's state (with --vision-from or --init-from, after taking that run's weights) and generators."""
    if config.vision_from is not None:
        take_vision(model, config.vision_from, dataset_record, config.out if dist.is_main else None)
    if config.init_from is not None:
        take_run(model, config.init_from, dataset_record)
    seed_rng(config.seed + 1_000_003 * dist.rank)  # each rank draws its own latent samples
    return TrainState.first(config)


def restore(model: WorldModel, checkpoint: dict[str, Any], config: TrainConfig, dist: distributed.DistInfo) -> TrainState:
    """The weights, this rank's generators and the training state of the run's checkpoint."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise InputError(f"the weights in {config.out / CHECKPOINT_FILE} do not fit its config; the checkpoint is "
                         "damaged: restore it, or start a new run in another --out") from None  # fmt: skip
    # Every rank continues its own random draws (latent samples, scheduled-sampling coins) where the
    # checkpoint caught them, so the resumed run is the uninterrupted one. With another number of
    # processes than the run had, the batches split differently anyway: rank 0 continues its draws and the
    # others start fresh, seeded streams (close to, not exactly, the uninterrupted run).
    saved_ranks = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    if len(saved_ranks) == dist.world_size:
        restore_rng_state(saved_ranks[dist.rank])
    else:
        if dist.is_main:
            print(f"warning: the run in {config.out} used {len(saved_ranks)} process(es), this resume "
                  f"{dist.world_size}: it continues, but not bit for bit", file=sys.stderr)  # fmt: skip
        restore_rng_state(saved_ranks[0])
        if dist.rank > 0:
            torch.manual_seed(config.seed + 1_000_003 * dist.rank + checkpoint["global_step"])
    return TrainState.from_checkpoint(checkpoint)


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------
def optimise_stage(
    run: Run, state: TrainState, optimizer: StageOptimizer, batches: Iterator[Batch], budget: int | None
) -> int:
    """Train the state's stage from its step to its end, or until ``budget`` steps (--halt-after) are taken,
    which writes a checkpoint; returns the steps taken. Logs, evaluates and checkpoints on the way."""
    config, dist, logger = run.config, run.dist, run.logger
    stage, total, offset = state.stage, state.stage.steps(config), state.stage.offset(config)
    compiled = stage == Stage.DYNAMICS and run.dynamics_compile.compiled
    inner = Objective(run.model, stage, config.observed_steps(stage), compiled=compiled)
    if stage == Stage.DYNAMICS and dist.is_main:
        print(run.dynamics_compile.reason, file=sys.stderr)
    objective: nn.Module = inner
    if dist.is_distributed:
        objective = DistributedDataParallel(objective, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    # frames (joint, vision) or keypoint frames (dynamics) per step over all processes (the batch sizes are
    # global), for the log's frames/s
    items_per_step = config.vision_batch_size * config.vision_window if stage == Stage.VISION else config.batch_size * config.window
    progress = None
    if dist.is_main and config.progress:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=state.step, desc=stage.value, unit="step", dynamic_ncols=True)
    seconds_before, started = state.stage_seconds.get(stage.value, 0.0), time.perf_counter()
    # steps/s over the steps since the last log line, with evaluation and checkpoint pauses left out
    last_log, paused, since_log, taken = time.perf_counter(), 0.0, 0, 0
    while state.step < total:
        if budget is not None and taken >= budget:
            save(run, state, optimizer)
            break
        optimizer.set_learning_rate(learning_rate_at(state.step, total, config))
        schedule = schedule_at(state.step, total, config, stage)
        batch = next(batches)
        if inner.compiled and taken == 0:  # the step that compiles
            out = first_compiled_step(run, inner, objective, optimizer, batch, schedule)
        else:
            out = train_step(objective, optimizer, batch, schedule, run.compute)
        state.step, taken, since_log = state.step + 1, taken + 1, since_log + 1
        if state.step % config.log_every == 0 or state.step == total:
            terms = torch.stack([*out.losses, out.grad_norm.float(), out.penalty.float()])
            names = [*out.losses._fields, "grad_norm", "l2_penalty"]
            record: dict[str, Any] = dict(zip(names, distributed.mean_over_ranks(terms).tolist()))  # syncs
            seconds = time.perf_counter() - last_log - paused
            record.update(
                lr=optimizer.optimizer.param_groups[0]["lr"],
                kl_scale=schedule.kl_scale,
                teacher_forcing_observed=schedule.teacher_forcing_observed,
                teacher_forcing_predicted=schedule.teacher_forcing_predicted,
                steps_per_s=since_log / seconds,
                frames_per_s=since_log * items_per_step / seconds,
            )
            if out.diagnostics is not None:  # keypoint collapse shows here first
                record.update(out.diagnostics._asdict())
            logger.log("train", stage.value, state.step, offset + state.step, record)
            state.final_losses[stage.value] = {name: record[name] for name in out.losses._fields}
            if progress is not None:
                progress.set_postfix(loss=f"{record['total']:.4g}", steps_s=f"{record['steps_per_s']:.2f}")
            last_log, paused, since_log = time.perf_counter(), 0.0, 0
        if progress is not None:
            progress.update(1)
        pause_started = time.perf_counter()
        if run.eval_set is not None and (state.step % config.eval_every == 0 or state.step == total):
            state.last_eval = run_evaluation(run, state, final=state.step == total)
        state.stage_seconds[stage.value] = seconds_before + time.perf_counter() - started
        if state.step < total and state.step % config.checkpoint_every == 0:  # the stage's end is the caller's to save
            save(run, state, optimizer)
        paused += time.perf_counter() - pause_started
    if progress is not None:
        progress.close()
    return taken


def keypoint_splits(run: Run, state: TrainState) -> dict[str, KeypointSplit]:
    """Every frame's keypoints: the run directory's cache if these vision weights made it, else detected now
    (deterministic: also after a resume whose cache was lost) and cached."""
    config, model = run.config, run.model
    if model.config.reads_states:  # the state-space bound: the stored states, read afresh (no cache needed)
        return {split: state_split(config.data, run.tasks, split, model.config) for split in storage.SPLITS}
    cache_path = config.out / KEYPOINT_CACHE_FILE
    fingerprint = vision_fingerprint(model)
    layout = data_layout(config.data, run.tasks)  # a cache of other files (e.g. before a part was added) is redone
    distributed.barrier()  # rank 0 has copied a --vision-from cache, if there is one
    splits = load_keypoint_cache(cache_path, fingerprint, layout)
    if splits is not None:
        return splits
    # Under torchrun rank 0 detects and caches the keypoints while the others wait and then read its cache:
    # every rank detecting the whole dataset on its share of the cores took as long as one process alone with
    # that share, and a rank that missed a --vision-from copy by a moment detected everything again.
    if not run.dist.is_main:
        distributed.barrier()
        splits = load_keypoint_cache(cache_path, fingerprint, layout)
        if splits is None:
            raise InputError(f"rank {run.dist.rank} cannot read the keypoint cache {cache_path} that rank 0 wrote: "
                             "under torchrun every process must see the same --out (a shared file system)")  # fmt: skip
        return splits
    started = time.perf_counter()
    model.eval()
    threads = torch.get_num_threads()
    if run.dist.device.type == "cpu":  # the other local ranks wait at the barrier: their share of the cores is free
        torch.set_num_threads(threads * run.dist.local_world_size)
    try:
        splits = {split: detect_split(model, config.data, run.tasks, split, run.dist.device, run.compute.precision,
                                      progress=config.progress) for split in storage.SPLITS}  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    model.train()
    seconds = time.perf_counter() - started
    state.stage_seconds[Stage.KEYPOINTS.value] = state.stage_seconds.get(Stage.KEYPOINTS.value, 0.0) + seconds
    save_keypoint_cache(cache_path, splits, fingerprint, layout)
    distributed.barrier()  # the other ranks read the cache now
    frames = sum(int(split.keypoints.shape[0]) for split in splits.values())
    run.logger.log("stage", Stage.KEYPOINTS.value, 0, Stage.KEYPOINTS.offset(config),
                   {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds})  # fmt: skip
    return splits


def stage_batches(run: Run, state: TrainState, splits: dict[str, KeypointSplit] | None) -> Iterator[Batch]:
    """The training batches of the state's stage from its step on: windows of frames, or of cached keypoints."""
    config, tasks, dist = run.config, run.tasks, run.dist
    if state.stage == Stage.DYNAMICS:
        assert splits is not None
        return keypoint_batches(splits["train"], config, state.step, dist)
    if state.stage == Stage.VISION:
        return frame_batches(config, tasks, config.vision_span, config.vision_batch_size, state.step, dist, salt=1,
                             frame_stride=config.vision_frame_stride)  # fmt: skip
    return frame_batches(config, tasks, config.window, config.batch_size, state.step, dist, salt=0)


def first_compiled_step(
    run: Run, inner: Objective, objective: nn.Module, optimizer: StageOptimizer, batch: Batch, schedule: Schedule
) -> StepOutput:
    """The training step that compiles the dynamics. A toolchain torch.compile cannot use fails here: then one
    line says so, the random state goes back to before the step, and the step and the stage run uncompiled
    (the same run as --compile-dynamics off)."""
    rng = capture_rng_state()
    try:
        return train_step(objective, optimizer, batch, schedule, run.compute)
    except Exception as error:  # noqa: BLE001 - any compiler failure; the stage goes on uncompiled
        restore_rng_state(rng)  # the retry draws what the failed step drew
        inner.compiled = False
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        print(f"torch.compile of the dynamics failed ({type(error).__name__}: {first_line}); "
              "the stage runs uncompiled (--compile-dynamics off skips the attempt)", file=sys.stderr)
        return train_step(objective, optimizer, batch, schedule, run.compute)


def write_summary(run: Run, state: TrainState, splits: dict[str, KeypointSplit] | None) -> None:
    """summary.json (rank 0): final evaluation, per-stage wall time, final losses, the dynamics benchmark."""
    config = run.config
    summary = {
        "complete": True,
        "profile": config.profile,
        "model": config.model,
        "mode": config.mode,
        "compute": run.compute.reason,
        "dynamics_compile": run.dynamics_compile.reason if config.mode == "staged" else None,
        "heap": run.heap.reason,
        "global_steps": state.global_step(config),
        "stage_seconds": {name: round(value, 1) for name, value in state.stage_seconds.items()},
        "final_losses": state.final_losses,
        "final_eval": state.last_eval,
        "dynamics_benchmark": None if splits is None else dynamics_benchmark(run.model, splits["test"], config),
        "dataset": run.dataset_record,
        "checkpoint": str(config.out / CHECKPOINT_FILE),
        "config": config_to_dict(config),
    }
    atomic_write_text(config.out / SUMMARY_FILE, json.dumps(summary, indent=2))
    run.logger.log("summary", Stage.DONE.value, 0, summary["global_steps"], {"stage_seconds": summary["stage_seconds"]})


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, tasks = prepare(parse_config(argv))
    except ValueError as error:  # InputError, or a ModelConfig check run while parsing
        return report(error)
    except BrokenPipeError:  # `--help | head`
        return closed_output()
    try:
        return run(config, tasks)
    except InputError as error:
        return report(error)


def prepare(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The config ready to train (the state-space bound's input sizes read from the data) and its tasks; a
    ValueError (InputError, or a ModelConfig check) for options that cannot run."""
    tasks = parse_tasks(config.tasks)
    if config.model == STATE_VARIANT:  # its input size is the data's: read the state sizes first
        dims = dataset_state_dims(config.data, tasks)
        config = dataclasses.replace(config, net=state_model_config(config.net, dims))
    validate(config)
    return config, tasks


def run(config: TrainConfig, tasks: list[str]) -> int:
    """Train (or resume, or find finished) the run of a ``prepare``d config, in this process: the Python form
    of the command line (downstream/loop.py refines its world model this way). InputError on bad input."""
    try:
        dist = distributed.setup(config.device)
        code = train(config, tasks, dist)
        # Rank 0 is still evaluating and writing the summary when the others finish their last step. A rank that
        # tore down its gloo group while a peer was still in it was aborted by the C++ runtime ("terminate
        # called without an active exception", ~1 in 10 torchrun runs on 2 cores): every rank leaves together.
        distributed.barrier()
        return code
    finally:
        distributed.cleanup()


def train(config: TrainConfig, tasks: list[str], dist: distributed.DistInfo) -> int:
    """The run: check the inputs (nothing is written before), start or resume, the stages, the summary."""
    try:
        compute = choose_compute(
            dist.device, config.precision, config.channels_last, config.dynamics_precision, config.model_config.dynamics_width
        )
        dynamics_compile = decide_compile(config.compile_dynamics, dist.device.type, compute.dynamics,
                                          config.dynamics_steps, compilation.cxx_compiler())
    except ValueError as error:  # e.g. --compile-dynamics on without a C++ compiler
        raise InputError(str(error)) from None
    checkpoint = existing_run(config)
    if checkpoint is not None and checkpoint["complete"]:  # a rerun of finished work, like the collector's
        if dist.is_main:
            print(f"the run in {config.out} is already complete: nothing to do ({config.out / SUMMARY_FILE})")
        return 0
    dataset_record = check_dataset(config, tasks)
    if checkpoint is not None:
        check_same_data(checkpoint, dataset_record, config)
    distributed.barrier()  # every rank has looked at the run directory before rank 0 writes to it

    heap = keep_freed_memory(config.keep_freed_memory)  # before the model and the data take their memory
    if dist.is_main:  # the inputs are valid: say how the convolutions will run
        announce(compute)  # e.g. "cpu AMD EPYC 7B13 (AVX2), no native bf16 -> fp32, channels_last"
        print(heap.reason, file=sys.stderr)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = compute.prepare(WorldModel(config.model_config).to(dist.device))
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    state = start(model, config, dist, dataset_record) if checkpoint is None else restore(model, checkpoint, config, dist)
    reads_frames = not config.model_config.reads_states  # the state-space bound's open-loop error is in the summary
    eval_set = (
        load_eval_set(config.data, tasks, config.window, config.eval_windows, config.seed)
        if dist.is_main and reads_frames
        else None
    )
    logger = RunLogger(config.out, dist.is_main, None if checkpoint is None else checkpoint["global_step"])
    if dist.is_main and checkpoint is None:
        atomic_write_text(config.out / "config.json", json.dumps(config_to_dict(config), indent=2))
    run = Run(config, tasks, dist, compute, model, logger, eval_set, dataset_record, dynamics_compile, heap)

    budget = config.halt_after  # optimizer steps this invocation may still take (None: to the end)
    splits: dict[str, KeypointSplit] | None = None  # staged mode's cached keypoints
    while state.stage != Stage.DONE:
        if state.stage in (Stage.KEYPOINTS, Stage.DYNAMICS) and splits is None:
            splits = keypoint_splits(run, state)
        if state.stage == Stage.KEYPOINTS:  # no optimizer steps: the dynamics' input statistics
            # Per feature, within episodes, so that task offsets don't dominate; a fine-tuned core (--init-from)
            # keeps the statistics its weights were trained with.
            if config.normalize_keypoints and config.init_from is None:
                assert splits is not None
                shortest = int(splits["train"].episode_lengths.min())
                model.fit_keypoint_normalization(splits["train"].sequences(shortest).to(dist.device))
        else:
            optimizer = StageOptimizer.for_stage(model, state.stage, config, compute)
            if checkpoint is not None and checkpoint["stage"] == state.stage:
                optimizer.restore(checkpoint)  # the stage the run was saved in
            taken = optimise_stage(run, state, optimizer, stage_batches(run, state, splits), budget)
            budget = None if budget is None else budget - taken
            if state.step < state.stage.steps(config):  # halted (--halt-after); its checkpoint is written
                logger.close()
                if dist.is_main:
                    print(f"halted after {config.halt_after} steps: continue with --resume --out {config.out}", file=sys.stderr)
                return 0
        state.advance(config)
        save(run, state)
    if dist.is_main:
        write_summary(run, state, splits)
    logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
