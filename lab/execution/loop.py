"""The per-worker training loop of one cell (Ray Train V2): :func:`train_loop_per_worker` and its epoch.

Per worker: build the dataset and the detector from the resolved config, wrap them with
``prepare_model`` / ``prepare_data_loader`` (DDP + ``DistributedSampler`` when there are several
workers), train with SGD and the 1x schedule, checkpoint every epoch, evaluate on rank 0.

Ray facts this relies on (shared notes §1):

* ``ray.train.report`` is a barrier: every rank calls it once per epoch, rank 0 attaching the
  checkpoint, so other ranks simply wait there while rank 0 evaluates.
* ``Result.metrics`` only carries metrics attached to a checkpoint, so the loop also *returns*
  its final metrics (``Result.return_value``) and logs them to MLflow itself.
* Workers ``chdir`` away from the driver's cwd: every path here is absolute.
* The run name is the cell's stable key: refitting with the same name resumes from the latest
  registered checkpoint (``ray.train.get_checkpoint()``).

The ``TorchTrainer`` around it, on the driver's side, is :mod:`lab.execution.train`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.torch import get_device, prepare_data_loader, prepare_model
from torch.utils.data import DataLoader, DistributedSampler

from detector.anchors import anchor_fit, dataset_boxes
from detector.data import build_dataset, collate_fn
from detector.digest import records_digest
from detector.ema import ModelEMA
from detector.repro import loader_generator, seed_everything, seed_loader_worker, set_determinism
from lab.execution import evaluation, faults
from lab.execution.resume import (
    STATE_FILE, CheckpointReadError, ResumeChoice, choose_resume_checkpoint, remove_checkpoints, verify_checkpoint,
    write_checkpoint_meta,
)
from lab.execution.runlog import SPOOL_WAIT_S, RunLog, spool_dir_for
from lab.execution.schedule import (
    all_rng_states, build_optimizer, build_scheduler, build_train_model, reposition_schedule, set_rng_state,
)
from lab.execution.worker import DeviceLoader, NonFiniteGuard, Progress, quiet_ray_train_logs, start_system_metrics
from lab.infra import storage
from lab.records import provenance
from lab.records.weights import load_checkpoint_state, resolve_num_classes, save_weights, unwrap
from lab.settings.config import LabConfig, config_from_dict, dump_config

#: Ray Train polls workers every 2 s; a checkpoint reported less than that before a crash may not be
#: registered yet (notes §1.6), so the fault-injection hook waits this long before failing.
_REGISTER_WAIT_S = 5.0


@dataclass
class LoopArgs:
    """What the driver passes to every worker besides the config (all plain values)."""

    name: str
    weights_path: str  #: absolute path of the final ``model.pt``
    #: the Ray run's directory (URI) holding its ``checkpoint_*`` dirs; "" = do not look there
    run_dir: str = ""
    run_id: str | None = None
    tracking_uri: str | None = None
    #: fault injection for tests: the ``DETLAB_FAULT`` spec (:mod:`lab.execution.faults`) that :func:`fit_cell`
    #: read where it was called, carried to every rank (a worker's own environment may predate it)
    fault: str = ""
    #: local mode inside a Tune trial: report each epoch (and its checkpoint) to Tune directly, and
    #: resume from Tune's checkpoint. Ray 2.60's local mode never calls Train callbacks, so
    #: ``TuneReportCallback`` would see nothing.
    report_to_tune: bool = False


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function. Returns (rank 0) the final metrics and resume bookkeeping."""
    cfg = config_from_dict(config["cfg"])
    args = LoopArgs(**config["args"])
    # Local mode inside a Tune trial: ray.train's worker API refuses to run in a Tune session (it
    # raises DeprecationWarning), and with one process there is nothing to prepare (no DDP, no sampler).
    in_tune = args.report_to_tune
    if in_tune:
        rank, world, local_rank, node = 0, 1, 0, None
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        ctx = ray.train.get_context()
        rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        node = f"node{ctx.get_node_rank()}" if world > ctx.get_local_world_size() else None
        device = get_device()
    quiet_ray_train_logs()
    set_determinism(cfg.threads, cfg.train.deterministic)
    seed_everything(cfg.train.seed + rank)
    # one system-metrics sampler per node (every local worker would report the same machine)
    monitor = start_system_metrics(cfg, args, node) if local_rank == 0 else None
    try:
        return _fit(cfg, args, rank, world, device, in_tune)
    finally:
        if monitor is not None:
            monitor.finish()


def _fit(cfg: LabConfig, args: LoopArgs, rank: int, world: int, device: torch.device, in_tune: bool) -> dict[str, Any]:
    """The body of :func:`train_loop_per_worker` on one placed worker."""
    use_amp = cfg.train.amp and device.type == "cuda"
    log = RunLog(args.tracking_uri, args.run_id, spool_dir_for(args.run_id)) if rank == 0 else RunLog(None, None)
    plan = faults.parse(args.fault)
    guard = NonFiniteGuard(cfg.train.max_nonfinite, plan.nan_at_steps if rank == world - 1 else frozenset())

    train_set = build_dataset(cfg.data, "train", train=True)
    cfg = resolve_num_classes(cfg, train_set)
    # our own sampler on every world size (1 too), seeded by train.seed: Ray's would use seed 0 for
    # every seed of a table, and the global RNG's order would not survive a resume. set_epoch below.
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    loader = DataLoader(
        train_set, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_fn,
        num_workers=cfg.data.loader_workers, persistent_workers=cfg.data.loader_workers > 0,
        generator=loader_generator(cfg.train.seed + rank), worker_init_fn=seed_loader_worker,
    )
    loader = DeviceLoader(loader, device) if in_tune else prepare_data_loader(loader, add_dist_sampler=False)
    iters = len(loader) if not cfg.train.max_iters else min(len(loader), cfg.train.max_iters)
    if iters == 0:
        raise ValueError(f"{args.name}: the train split has {len(train_set)} images, fewer than one batch per worker")

    net = build_train_model(cfg)
    model = net.to(device) if in_tune else prepare_model(net)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg, iters)
    t = cfg.train
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    ema = ModelEMA(unwrap(model), t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None

    start_epoch, metrics = 0, {}
    if rank == 0:
        # every attempt, resumed or restarted at epoch 0: what an earlier one logged (or left in the
        # spool) after the point this one starts from is not logged twice
        log.skip_logged()
    # a restored trial resumes from the last epoch Tune kept; a Train run from its latest checkpoint
    checkpoint = ray.tune.get_checkpoint() if in_tune else ray.train.get_checkpoint()
    adopted: tuple[Any, str] | None = None  # (fs, path): a complete checkpoint Ray had not registered
    resume: _Resume | None = None
    if not in_tune and args.run_dir:
        resume = _resume_checkpoint(args, checkpoint, rank, world)
        checkpoint, adopted = resume.checkpoint, resume.adopted
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint_state(Path(d) / STATE_FILE)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, metrics = state["epoch"] + 1, state["metrics"]
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:  # different world size than when saved: a deterministic fresh stream per rank
            seed_everything(cfg.train.seed + rank + 1000 * start_epoch)
            # iterations per epoch and the linearly scaled lr both changed with the world size
            reposition_schedule(optimizer, scheduler, cfg.lr, start_epoch * iters)
            if rank == 0:
                print(f"[{args.name}] resumed with {world} worker(s) instead of {len(rngs)}: lr {cfg.lr:.3g}, "
                      f"schedule at iteration {start_epoch * iters} of {t.epochs * iters}", flush=True)
        if rank == 0:
            # a point at each epoch a recovery restarted from (shown beside the loss curves)
            log.metrics({"resumed_from_epoch": float(start_epoch), "resume_world_size": float(world)}, start_epoch)
            print(f"[{args.name}] resumed from the epoch-{start_epoch} checkpoint", flush=True)
    elif rank == 0:
        log.text(dump_config(cfg, scrub=True), "config/resolved.yaml")
        log.tags(_provenance_tags(cfg, train_set))
        fit = anchor_fit(dataset_boxes(train_set.records, cfg.model.min_size, cfg.model.max_size),
                         cfg.model.anchor_sizes, cfg.assign.fg_threshold)
        log.metrics(fit.metrics(), 0)
        print(f"[{args.name}] {fit.summary()}", flush=True)
        print(
            f"[{args.name}] training {t.epochs} epochs x {iters} iters, {world} worker(s) x batch {t.batch_size}, "
            f"lr {cfg.lr:.3g}, device {device.type}{', amp' if use_amp else ''}", flush=True,
        )

    if resume is not None and rank == 0:
        resume.remove_superseded(args.name)  # only now that the chosen checkpoint has loaded

    progress = Progress(args.name, t.epochs, iters, start_epoch, t.log_every, enabled=rank == 0)
    val_set = None
    for epoch in range(start_epoch, t.epochs):
        sampler.set_epoch(epoch)  # else every epoch sees the same order
        epoch_metrics = _train_one_epoch(model, loader, iters, optimizer, scheduler, scaler, cfg, epoch,
                                         device, use_amp, progress, log, world, guard, ema)
        last = epoch == t.epochs - 1
        metrics = dict(epoch_metrics)
        rngs = all_rng_states(world)  # the last collective before rank 0 may evaluate for long
        if rank == 0 and (last or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0)):
            # rank 0 evaluates; the other ranks are already waiting in ray.train.report below
            val_set = val_set or build_dataset(cfg.data, "val", train=False)
            metrics.update(_evaluate(_evaluated(model, ema), val_set, cfg, device, log, epoch, args, final=last))
        with tempfile.TemporaryDirectory() as d, _checkpoint_write(args.name, epoch):
            ckpt = None
            if rank == 0:
                torch.save(
                    {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "rng": rngs, "metrics": metrics,
                     **({"ema": ema.state_dict()} if ema is not None else {})},
                    Path(d) / STATE_FILE,
                )
                write_checkpoint_meta(d, epoch)  # lets a resume tell a complete copy from a partial one
                ckpt = Checkpoint.from_directory(d)
            # Ray copies the directory into storage (a new checkpoint_* dir) and only then drops
            # the previous one (num_to_keep=1): a failed copy leaves the last good checkpoint registered.
            if in_tune:
                # copies the checkpoint into the trial's storage; ASHA may end this thread here
                ray.tune.report({"epoch": epoch + 1, **metrics}, checkpoint=ckpt)
            else:
                ray.train.report({"epoch": epoch + 1, **metrics}, checkpoint=ckpt)
        if adopted is not None and rank == 0:
            # a newer checkpoint is now in storage; Ray never deletes the one it did not register
            remove_checkpoints(adopted[0], [adopted[1]], args.name, "superseded by this attempt's checkpoint")
            adopted = None
        if rank == world - 1:
            _inject_after_epoch(plan, args, epoch)

    if rank == 0 and start_epoch >= t.epochs:
        # Trained by an earlier attempt (e.g. rerun with --force, or the driver died before closing
        # the run): evaluate again so that this MLflow run gets its metrics and artifacts.
        print(f"[{args.name}] already trained {t.epochs} epochs; evaluating the final weights", flush=True)
        val_set = build_dataset(cfg.data, "val", train=False)
        metrics = {**metrics, **_evaluate(_evaluated(model, ema), val_set, cfg, device, log, t.epochs - 1, args,
                                          final=True)}
    unsent = log.close(SPOOL_WAIT_S)
    if unsent:
        print(f"[{args.name}] {unsent} MLflow write(s) could not be sent ({log.last_error}); they are kept in "
              f"{log.spool} for the driver to replay", flush=True)
    _log_node_ids(args, world, rank)  # which Ray nodes this cell's ranks ran on (a collective)
    return {
        "metrics": metrics, "start_epoch": start_epoch, "world_size": world,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "model_type": type(model).__name__, "weights": args.weights_path,
        "nonfinite_steps": guard.total,
        "mlflow": {"failed_writes": log.failed_writes, "late_writes": log.late_writes, "unsent": unsent},
    }


@dataclass
class _Resume:
    """What :func:`_resume_checkpoint` decided: the checkpoint to load (None = start fresh) and, when
    it is one Ray had not registered, ``adopted = (fs, path)`` for deleting it once this attempt
    has written a newer one. ``remove`` is deleted by rank 0 only after the state has loaded."""

    checkpoint: Checkpoint | None
    adopted: tuple[Any, str] | None
    fs: Any
    remove: tuple[str, ...] = ()

    def remove_superseded(self, name: str) -> None:
        remove_checkpoints(self.fs, self.remove, name,
                           "a checkpoint a failed attempt did not finish writing, a corrupt one, or an older one")
        self.remove = ()


def _resume_checkpoint(args: LoopArgs, registered: Checkpoint | None, rank: int, world: int) -> _Resume:
    """The checkpoint to resume from: the newest complete one of the run (:mod:`lab.execution.resume`).

    Rank 0 decides, verifies an unregistered choice against its checksum (falling back to Ray's
    registered checkpoint if it does not match), and tells the other ranks (they must load the
    same epoch). A store error stops the attempt on every rank (:class:`lab.execution.resume.CheckpointReadError`),
    with nothing deleted. Nothing is deleted here: :meth:`_Resume.remove_superseded` runs after the load.
    """
    fs, run_dir = storage.filesystem(args.run_dir)
    choice: ResumeChoice | str | None = None
    if rank == 0:
        try:
            choice = choose_resume_checkpoint(fs, run_dir, registered.path if registered is not None else None)
            if choice.adopted and not verify_checkpoint(fs, choice.path):
                print(f"[{args.name}] the epoch-{choice.epoch + 1} checkpoint {choice.path} does not match its "
                      f"checksum; resuming from the one Ray registered instead", flush=True)
                choice = choice.fall_back()
        except CheckpointReadError as e:
            choice = str(e)  # every rank raises it below, instead of waiting in the broadcast
    if world > 1 and dist.is_available() and dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    if isinstance(choice, str):
        raise CheckpointReadError(f"[{args.name}] {choice}")
    assert choice is not None
    if not choice.adopted:
        return _Resume(registered, None, fs, choice.remove)
    if rank == 0:
        if registered is None:
            reg = "none registered"
        else:
            e = choice.registered_epoch
            reg = f"the epoch-{'?' if e is None else e + 1} one Ray registered"
        print(f"[{args.name}] resuming from the complete epoch-{choice.epoch + 1} checkpoint {choice.path}, newer "
              f"than {reg} (the previous attempt ended before Ray recorded it)", flush=True)
    return _Resume(Checkpoint(path=choice.path, filesystem=fs), (fs, choice.path), fs, choice.remove)


#: what torch's zip writer (``torch.save``) says when a write fails: it raises RuntimeError, not OSError
_TORCH_WRITE_FAILED = ("PytorchStreamWriter", "inline_container.cc")


@contextmanager
def _checkpoint_write(name: str, epoch: int) -> Iterator[None]:
    """A full disk (or quota) while writing/uploading a checkpoint: say what happened and that the
    previous checkpoint is intact, instead of a bare error from deep inside torch or pyarrow.

    torch serialises into a temp dir (``/tmp``) and reports a failed write as RuntimeError; Ray's
    copy into storage raises OSError. Other RuntimeErrors are not about writing and pass through.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not isinstance(e, OSError) and not any(m in str(e) for m in _TORCH_WRITE_FAILED):
            raise
        previous = f"the epoch-{epoch} checkpoint is intact" if epoch > 0 else "no earlier checkpoint exists"
        tmp = tempfile.gettempdir()
        free = shutil.disk_usage(tmp).free
        code = e.errno if isinstance(e, OSError) and e.errno else errno.ENOSPC if free < 64 * 2**20 else errno.EIO
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OSError(code, f"[{name}] writing the epoch-{epoch + 1} checkpoint failed ({type(e).__name__}: {detail}; "
                            f"{free / 2**20:.0f} MiB free in {tmp}). Nothing was replaced: {previous}; free space "
                            f"and rerun the same command to resume from it") from e


def _inject_after_epoch(plan: faults.FaultPlan, args: LoopArgs, epoch: int) -> None:
    """The fault hooks (last rank, after this epoch's checkpoint): see :mod:`lab.execution.faults`."""
    if plan.raise_after_epoch == epoch:
        time.sleep(_REGISTER_WAIT_S)
        raise RuntimeError(f"[{args.name}] injected failure after epoch {epoch + 1} (fault-injection test hook)")
    if plan.exit_after_epoch == epoch:
        time.sleep(_REGISTER_WAIT_S)
        print(f"[{args.name}] injected os._exit(1) after epoch {epoch + 1} (fault-injection test hook)", flush=True)
        os._exit(1)
    if plan.pause_after_epoch and plan.pause_after_epoch[0] == epoch:
        time.sleep(_REGISTER_WAIT_S)
        marker = os.environ.get(faults.FILE_ENV)
        if marker:
            Path(marker).write_text(ray.get_runtime_context().get_node_id())
        print(f"[{args.name}] paused after epoch {epoch + 1} for {plan.pause_after_epoch[1]:.0f}s "
              f"(fault-injection test hook)", flush=True)
        time.sleep(plan.pause_after_epoch[1])


def _log_node_ids(args: LoopArgs, world: int, rank: int) -> None:
    """Tag the cell's run with its ranks' Ray node ids (``detlab.node_ids``; every rank calls this)."""
    from lab.infra.nodes import log_node_ids

    log_node_ids(args.tracking_uri, args.run_id, world, rank)


#: per-epoch sums of :func:`_train_one_epoch`, in the order they are all-reduced over ranks.
_EPOCH_SUMS = (
    "loss", "cls", "reg", "positives",
    "iac_score_positives", "iac_steps",  # score-rule positives/image summed over the steps where the rule ran
    "dc_lambda_p5", "dc_lambda_p50", "dc_lambda_p95", "dc_steps",  # per-step lambda' percentiles (DC on)
    "data_wait_s", "compute_s", "steps", "images", "nonfinite",
)


def _train_one_epoch(model, loader, iters, optimizer, scheduler, scaler, cfg, epoch, device, use_amp,
                     progress, log, world, guard: NonFiniteGuard, ema: ModelEMA | None = None) -> dict[str, float]:
    """One epoch (at most ``iters`` steps); returns epoch metrics reduced over ranks.

    Besides the losses, lr and throughput it logs:

    * ``positives_per_image``: mean over all steps; ``iac_score_positives_per_image``: mean over
      the steps where IAC's score rule ran (``assign.iac`` on and ``assign.warmup_iters`` over), so
      warm-up steps do not dilute it; ``iac_active_frac``: the share of steps where it ran.
    * ``dc_lambda_p5/p50/p95`` (``loss.dc`` only): the mean over steps of each step's percentile
      of the positives' lambda' (eq. 2), not the percentile over the epoch's pooled positives.
    * ``nonfinite_steps``: steps skipped for a NaN/inf loss (:class:`NonFiniteGuard`).
    * ``data_wait_s`` (time blocked on the next batch), ``compute_s`` (forward, backward, optimizer
      and scheduler step; on CUDA up to a device synchronise, so queued kernels are not billed to
      the data wait) and ``data_wait_frac = data_wait_s / (data_wait_s + compute_s)``: seconds per
      epoch, the mean over ranks. Progress printing and step logging count in neither.
    """
    model.train()
    net = unwrap(model)
    acc = dict.fromkeys(_EPOCH_SUMS, 0.0)
    t0 = time.perf_counter()
    batches = iter(loader)
    for it in range(iters):
        t_wait = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        t_step = time.perf_counter()
        acc["data_wait_s"] += t_step - t_wait
        with torch.autocast(device.type, enabled=use_amp):
            parts = model(images, targets)
        loss = sum(parts.values())
        loss, ok = guard.check(loss, parts, epoch * iters + it + 1, epoch, it, world)
        optimizer.zero_grad(set_to_none=True)
        if not ok:
            # no backward: every rank skips this step (DDP's hooks fire only in backward); the
            # schedule still advances so a resumed run and this one stay on the same iteration
            scheduler.step()
            acc["nonfinite"] += 1
            acc["compute_s"] += time.perf_counter() - t_step
            continue
        scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(net)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        vals = {k: float(v.detach()) for k, v in parts.items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        acc["compute_s"] += time.perf_counter() - t_step

        loss_value = float(loss.detach())
        stats = getattr(net, "assign_stats", {})
        acc["steps"] += 1
        acc["images"] += len(images)
        acc["loss"] += loss_value
        acc["cls"] += vals.get("classification", 0.0)
        acc["reg"] += vals.get("bbox_regression", 0.0)
        acc["positives"] += stats.get("positives_per_image", 0.0)
        if stats.get("iac_active", 0.0):
            acc["iac_steps"] += 1
            acc["iac_score_positives"] += stats.get("iac_score_positives_per_image", 0.0)
        dc = getattr(net, "dc_stats", {})
        if dc:
            acc["dc_steps"] += 1
            for key in ("dc_lambda_p5", "dc_lambda_p50", "dc_lambda_p95"):
                acc[key] += dc[key]
        img_per_s = acc["images"] * world / (time.perf_counter() - t0)  # ranks run in lock-step under DDP
        short = {"cls": vals.get("classification", 0.0), "reg": vals.get("bbox_regression", 0.0)}
        progress.step(epoch, it, loss_value, short, lr, img_per_s)
        step = epoch * iters + it + 1
        if (it + 1) % cfg.train.log_every == 0:
            log.metrics({"step_loss": loss_value, "step_lr": lr}, step)
    seconds = time.perf_counter() - t0
    sums = torch.tensor([acc[k] for k in _EPOCH_SUMS], dtype=torch.float64)
    ranks = 1
    if world > 1 and dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums, ranks = sums.cpu(), world
    total = dict(zip(_EPOCH_SUMS, sums.tolist()))
    steps = max(total["steps"], 1.0)
    busy = total["data_wait_s"] + total["compute_s"]
    metrics = {
        "train_loss": total["loss"] / steps, "train_loss_cls": total["cls"] / steps, "train_loss_reg": total["reg"] / steps,
        "lr": optimizer.param_groups[0]["lr"], "images_per_s": total["images"] / seconds, "epoch_time_s": seconds,
        "positives_per_image": total["positives"] / steps,
        "iac_score_positives_per_image": total["iac_score_positives"] / max(total["iac_steps"], 1.0),
        "iac_active_frac": total["iac_steps"] / steps,
        "data_wait_s": total["data_wait_s"] / ranks, "compute_s": total["compute_s"] / ranks,
        "data_wait_frac": total["data_wait_s"] / busy if busy > 0 else 0.0,
        "nonfinite_steps": total["nonfinite"] / ranks,  # every rank skips the same steps
    }
    if cfg.loss.dc and total["dc_steps"] > 0:
        for key in ("dc_lambda_p5", "dc_lambda_p50", "dc_lambda_p95"):
            metrics[key] = total[key] / total["dc_steps"]
    log.metrics(metrics, epoch + 1)
    return metrics


def _evaluated(model: torch.nn.Module, ema: ModelEMA | None) -> torch.nn.Module:
    """The weights that are evaluated and saved: the EMA's when ``train.ema_decay > 0``."""
    return unwrap(model) if ema is None else ema.module


def _provenance_tags(cfg: LabConfig, train_set: Any) -> dict[str, str]:
    """Rank 0's tags of a fresh run: this machine and its libraries (:func:`lab.records.provenance.machine_tags`),
    the train split's digest and the backbone file's sha256 (the val split's is tagged at its evaluation)."""
    tags = provenance.machine_tags(cfg.threads)
    tags[provenance.DATA_DIGEST_PREFIX + "train"] = records_digest(train_set.class_names, train_set.records)
    if cfg.model.weights_backbone_sha256:
        tags[provenance.TAG_BACKBONE_SHA] = cfg.model.weights_backbone_sha256
    return tags


def _evaluate(model, val_set, cfg: LabConfig, device, log: RunLog, epoch: int, args: LoopArgs, final: bool) -> dict[str, float]:
    """Rank 0: val metrics (logged at step epoch+1); on the last epoch also artifacts and final weights."""
    t0 = time.perf_counter()
    net = unwrap(model)
    result = evaluation.evaluate(net, val_set, device, cfg.eval.batch_size, voc07_exact=cfg.eval.voc07_exact_thresholds)
    metrics = {**result.metrics, "eval_time_s": time.perf_counter() - t0}
    # final: these describe the weights saved below, so they supersede what an attempt whose final
    # checkpoint then failed logged for weights that were discarded
    log.metrics(metrics, epoch + 1, final=final)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items() if k in ("AP", "AP50", "mAP", "misalign_spearman"))
    print(f"[{args.name}] eval after epoch {epoch + 1}: {shown} ({metrics['eval_time_s']:.1f}s)", flush=True)
    if final:
        log.tags({provenance.DATA_DIGEST_PREFIX + "val": records_digest(val_set.class_names, val_set.records)})
        save_weights(Path(args.weights_path), net, cfg, list(val_set.class_names))
        evaluation.log_eval_artifacts(log, val_set, result, cfg, args.name)
        if cfg.eval.test_dev_ann:
            evaluation.write_test_dev(net, cfg, device, log, args.name)
    return metrics
