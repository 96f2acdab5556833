"""GPU acceptance check of a detlab node: five checks, one line each, at most 8 minutes on one GPU.

    bash bench/gpu_check.sh                   # on a CUDA machine (picks or creates the Python env)
    python bench/gpu_check.py --cpu-dry-run   # the same code paths on CPU at tiny sizes (gloo, bf16)

Checks (each in its own process under a timeout, so a hung NCCL init or kernel costs only its own
budget; all of them share an 8-minute deadline):

* ``retinanet_amp_step``: AMP train step of R-50 RetinaNet at 800x1333, batch 2: ours with IAC + DC
  (``detector.model.build_detector``) against torchvision's stock ``retinanet_resnet50_fpn``
  (weights=None, weights_backbone=None), steps alternating in one process after warm-up; images/s
  and their ratio (PASS: ratio >= ``--min-step-ratio``, every loss finite).
* ``gfl_amp_step``: the same step for ``model.detector=gfl``; images/s (PASS: finite losses).
* ``ray_train``: ``lab.execution.train.fit_cell`` with one Ray Train worker holding the GPU, one short epoch of
  the smoke profile (PASS: the backend is nccl, a checkpoint exists).
* ``clb_nms``: ``detector.nms.clb_nms`` on CUDA against ``torchvision.ops.batched_nms`` on 5000
  clustered boxes (PASS: with beta=0 it equals batched_nms, as its docstring says; the time ratio
  at beta=1 is <= ``--max-nms-ratio``, a sanity bound against host syncs per box).
* ``coco_eval``: ``detector.evaluate.coco_evaluate`` on detections made on the GPU over the smoke
  shapes val set, by the ``ray_train`` check's weights if it left them, else an untrained model
  (PASS: it runs and returns the AP keys).

Output: ``CHECK <name> PASS|FAIL <numbers>`` per check, then a summary line; a failed check's log
tail goes to stderr and every log stays under ``--workdir``. Exit status: 0 all passed, 1 some
failed, 2 no CUDA device (nothing was run; no Ray, no subprocess).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("retinanet_amp_step", "gfl_amp_step", "ray_train", "clb_nms", "coco_eval")
NUM_CLASSES = 80
NO_CUDA_EXIT = 2
_LINE = re.compile(r"^CHECK (\S+) (PASS|FAIL)(?: (.*))?$")


@dataclass(frozen=True)
class Mode:
    """Sizes, repetitions and limits of a run: the real one on a GPU, or the CPU dry run."""

    device: str
    min_size: int  #: image height; the detectors' min_size, so nothing is resized
    max_size: int  #: image width; the detectors' max_size
    batch: int
    warmup: int  #: steps per model before timing (allocator, cuDNN autotuning, lazy init)
    steps: int  #: timed steps per model, alternating between the two
    amp_dtype: str  #: autocast dtype: float16 on CUDA (GradScaler on), bfloat16 on CPU
    nms_boxes: int
    nms_reps: int
    backend: str  #: the process group Ray Train must pick (backend=None: nccl with GPUs, else gloo)
    budget_s: float  #: deadline over all checks
    timeouts: dict[str, float] = field(default_factory=dict)
    gated: bool = True  #: apply the speed thresholds (not at the dry run's toy sizes on a busy CPU)


GPU = Mode("cuda", 800, 1333, 2, 3, 10, "float16", 5000, 50, "nccl", budget_s=470,
           timeouts={"retinanet_amp_step": 120, "gfl_amp_step": 90, "ray_train": 150, "clb_nms": 45, "coco_eval": 60})
CPU_DRY = Mode("cpu", 96, 160, 2, 1, 2, "bfloat16", 1000, 10, "gloo", budget_s=1500, gated=False,
               timeouts={"retinanet_amp_step": 300, "gfl_amp_step": 300, "ray_train": 400, "clb_nms": 120,
                         "coco_eval": 200})


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    numbers: str
    seconds: float = 0.0

    def line(self) -> str:
        return f"CHECK {self.name} {'PASS' if self.ok else 'FAIL'} {self.numbers}".rstrip()


# ---------------------------------------------------------------------------------------------
# Parent: run each check in a subprocess under its timeout


def _kill_group(leader: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group a check leads (its Ray processes included)."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(leader.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            leader.poll()  # reap the leader, or its zombie keeps the group alive
            try:
                os.killpg(leader.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def last_check_line(text: str, name: str) -> tuple[bool, str] | None:
    """The last ``CHECK <name> PASS|FAIL ...`` line of a check's output: (passed, numbers)."""
    for line in reversed(text.splitlines()):
        m = _LINE.match(line.strip())
        if m and m.group(1) == name:
            return m.group(2) == "PASS", m.group(3) or ""
    return None


def run_check(name: str, argv: list[str], timeout_s: float, log: Path) -> CheckResult:
    """Run ``argv`` (a check's process) in a session of its own, output to ``log``; its result is the
    last CHECK line it printed, PASS only with exit status 0. On timeout the whole session is killed."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return CheckResult(name, False, f"timeout after {timeout_s:.0f}s", time.monotonic() - t0)
    _kill_group(proc)  # whatever it left behind (a Ray process that outlived ray.shutdown)
    seconds = time.monotonic() - t0
    found = last_check_line(log.read_text(errors="replace"), name)
    if found is None:
        return CheckResult(name, False, f"exited {rc} without a CHECK line", seconds)
    passed, numbers = found
    if passed and rc != 0:
        return CheckResult(name, False, f"{numbers} (but exited {rc})", seconds)
    return CheckResult(name, passed, numbers, seconds)


def _no_cuda_message() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    return (f"gpu_check: FAIL no CUDA device: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees "
            f"no GPU (CUDA_VISIBLE_DEVICES={visible!r}); nothing was run. On a machine without a GPU, "
            f"--cpu-dry-run runs the same code paths on CPU at tiny sizes.")


def run_all(mode: Mode, names: list[str], workdir: Path, child_opts: list[str]) -> list[CheckResult]:
    deadline = time.monotonic() + mode.budget_s
    results = []
    for name in names:
        timeout = min(mode.timeouts[name], deadline - time.monotonic())
        if timeout < 5:
            result = CheckResult(name, False, f"not run: the {mode.budget_s:.0f}s budget is spent")
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--workdir", str(workdir),
                    *child_opts]
            result = run_check(name, argv, timeout, workdir / f"{name}.log")
        print(result.line(), flush=True)
        if not result.ok and (workdir / f"{name}.log").is_file():
            tail = (workdir / f"{name}.log").read_text(errors="replace").splitlines()[-20:]
            print(f"--- {name}: last lines of {workdir / f'{name}.log'}\n" + "\n".join(tail), file=sys.stderr, flush=True)
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# Children: the checks


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(mode: Mode, device: Any, seed: int = 0) -> tuple[list[Any], list[dict[str, Any]]]:
    """``mode.batch`` random images of min_size x max_size with 6 boxes each, on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, w = mode.min_size, mode.max_size
    images, targets = [], []
    for _ in range(mode.batch):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35]) + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, NUM_CLASSES, (6,), generator=g).to(device)})
    return images, targets


class _Stepper:
    """One model's AMP train step (autocast + GradScaler as lab.execution.loop does), timed to a device sync."""

    def __init__(self, model: Any, mode: Mode, device: Any):
        import torch

        self.model, self.device = model.to(device).train(), device
        self.dtype = getattr(torch, mode.amp_dtype)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, images: list[Any], targets: list[dict[str, Any]], timed: bool) -> None:
        import torch

        _sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype):
            loss = sum(self.model(images, targets).values())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        _sync(self.device)
        if timed:
            self.times.append(time.perf_counter() - t0)
            self.losses.append(float(loss.detach()))

    def images_per_s(self, batch: int) -> float:
        return batch / statistics.median(self.times)

    def finite(self) -> bool:
        return all(math.isfinite(x) for x in self.losses)


def _run_alternating(steppers: list[_Stepper], mode: Mode, device: Any) -> None:
    """Warm-up, then timed steps alternating the order between models so that drift hits all alike."""
    images, targets = _batch(mode, device)
    for _ in range(mode.warmup):
        for s in steppers:
            s.step(images, targets, timed=False)
    for i in range(mode.steps):
        for s in (steppers if i % 2 == 0 else steppers[::-1]):
            s.step(images, targets, timed=True)


def _detector_cfg(mode: Mode, **keys: Any) -> Any:
    from detector.config import DetectorConfig, apply_overrides

    return apply_overrides(DetectorConfig(), {"model.backbone": "resnet50", "model.num_classes": NUM_CLASSES,
                                              "model.min_size": mode.min_size, "model.max_size": mode.max_size, **keys})


def _peak_mem(device: Any) -> str:
    import torch

    if device.type != "cuda":
        return ""
    return f", {torch.cuda.get_device_name(device)}, peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def check_retinanet_amp_step(mode: Mode, device: Any, workdir: Path, opts: argparse.Namespace) -> tuple[bool, str]:
    import torch
    from torchvision.models.detection import retinanet_resnet50_fpn

    from detector.model import build_detector

    torch.manual_seed(0)
    ours = _Stepper(build_detector(_detector_cfg(mode, **{"assign.iac": True, "loss.dc": True,
                                                         "assign.score_threshold": 0.6})), mode, device)
    stock = _Stepper(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                            min_size=mode.min_size, max_size=mode.max_size), mode, device)
    _run_alternating([ours, stock], mode, device)
    a, b = ours.images_per_s(mode.batch), stock.images_per_s(mode.batch)
    ratio = a / b
    gate = f">= {opts.min_step_ratio:.2f}" if mode.gated else "not gated in the dry run"
    ok = ours.finite() and stock.finite() and (ratio >= opts.min_step_ratio or not mode.gated)
    return ok, (f"ours (IAC+DC) {a:.2f} img/s, stock {b:.2f} img/s, ratio {ratio:.3f} ({gate}), "
                f"{mode.min_size}x{mode.max_size} batch {mode.batch} {mode.amp_dtype}, "
                f"losses finite {ours.finite() and stock.finite()}{_peak_mem(device)}")


def check_gfl_amp_step(mode: Mode, device: Any, workdir: Path, opts: argparse.Namespace) -> tuple[bool, str]:
    import torch

    from detector.model import build_detector

    torch.manual_seed(0)
    gfl = _Stepper(build_detector(_detector_cfg(mode, **{"model.detector": "gfl"})), mode, device)
    _run_alternating([gfl], mode, device)
    return gfl.finite(), (f"gfl {gfl.images_per_s(mode.batch):.2f} img/s, {mode.min_size}x{mode.max_size} "
                          f"batch {mode.batch} {mode.amp_dtype}, losses finite {gfl.finite()}{_peak_mem(device)}")


def check_ray_train(mode: Mode, device: Any, workdir: Path, opts: argparse.Namespace) -> tuple[bool, str]:
    import ray

    from lab.plan.experiments import load_profile, single_cell
    from lab.execution.train import fit_cell

    gpu = device.type == "cuda"
    user = {"scaling": {"workers": 1, "gpus_per_worker": 1.0 if gpu else 0.0, "cpus_per_worker": 1},
            "train": {"epochs": 1, "amp": gpu}}
    cell = single_cell(load_profile("smoke"), user, "shapes")
    storage = workdir / "ray"
    # address="local": a private cluster, never one already running here; a short temp dir (AF_UNIX paths)
    ray.init(address="local", num_cpus=2, num_gpus=1 if gpu else 0, include_dashboard=True,
             object_store_memory=200 * 1024**2, _temp_dir=f"/tmp/dgc-{os.getpid()}", logging_level="WARNING")
    t0 = time.perf_counter()
    try:
        out = fit_cell(cell.cfg, name="gpu-check", run_name="gpu-check", storage_path=str(storage))
    finally:
        ray.shutdown()
    fit_s = time.perf_counter() - t0
    checkpoints = sorted(d for d in (storage / "gpu-check").glob("checkpoint_*") if d.is_dir())
    weights = Path(str(out.get("weights", "")))
    if weights.is_file():
        (workdir / "weights.txt").write_text(str(weights))  # for coco_eval
    metrics = out.get("metrics") or {}
    backend = out.get("backend")
    ok = backend == mode.backend and bool(checkpoints) and out.get("world_size") == 1
    return ok, (f"backend {backend} (want {mode.backend}), world {out.get('world_size')}, "
                f"{len(checkpoints)} checkpoint(s) under {storage / 'gpu-check'}, weights {weights.is_file()}, "
                f"loss {metrics.get('train_loss', metrics.get('loss', float('nan'))):.3f}, "
                f"AP {metrics.get('AP', float('nan')):.2f}, fit {fit_s:.0f}s")


def check_clb_nms(mode: Mode, device: Any, workdir: Path, opts: argparse.Namespace) -> tuple[bool, str]:
    import torch
    from torchvision.ops import batched_nms

    from detector.nms import clb_nms

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_nms import clustered_candidates

    def median_ms(fn: Callable[[], Any], reps: int) -> float:
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    agree, worst, shown = True, 0.0, ""
    for relabel in (0.0, 0.2):  # boxes keep their object's class / 20 % relabelled at random
        boxes, scores, logits, labels = (t.to(device) for t in clustered_candidates(mode.nms_boxes, 0, relabel=relabel))
        ref = batched_nms(boxes, scores, labels, 0.5)
        plain = clb_nms(boxes, scores, logits, labels, 0.5, beta=0.0)
        agree &= torch.equal(plain.keep, ref) and torch.equal(plain.scores, scores[ref])
        for _ in range(3):  # warm-up (kernels, allocator)
            batched_nms(boxes, scores, labels, 0.5), clb_nms(boxes, scores, logits, labels, 0.5, beta=1.0)
        t_ref, t_clb = [], []
        for _ in range(5):  # alternate the two so drift hits both alike
            t_ref.append(median_ms(lambda: batched_nms(boxes, scores, labels, 0.5), mode.nms_reps // 5))
            t_clb.append(median_ms(lambda: clb_nms(boxes, scores, logits, labels, 0.5, beta=1.0), mode.nms_reps // 5))
        a, b = statistics.median(t_ref), statistics.median(t_clb)
        if b / a >= worst:
            worst, shown = b / a, f"batched_nms {a:.3f} ms, clb_nms {b:.3f} ms (relabel {relabel}, kept {ref.numel()})"
    gate = f"<= {opts.max_nms_ratio:.1f}" if mode.gated else "not gated in the dry run"
    ok = agree and (worst <= opts.max_nms_ratio or not mode.gated)
    return ok, (f"n {mode.nms_boxes} on {device.type}, beta=0 equals batched_nms {agree}, "
                f"worst ratio {worst:.2f}x ({gate}): {shown}")


def check_coco_eval(mode: Mode, device: Any, workdir: Path, opts: argparse.Namespace) -> tuple[bool, str]:
    import torch
    from torch.utils.data import DataLoader

    from detector.config import apply_overrides
    from detector.data import build_dataset, collate_fn
    from detector.evaluate import coco_evaluate, predictions_to_coco
    from detector.model import build_detector
    from lab.settings.config import config_from_dict
    from lab.plan.experiments import load_profile, single_cell
    from lab.records.weights import load_weights, resolve_num_classes

    # a low score threshold: an (almost) untrained model's scores sit near the 0.01 prior
    low = ["model.score_thresh=0.001"]
    cfg = single_cell(load_profile("smoke"), {}, "shapes").cfg
    val = build_dataset(cfg.data, "val", train=False)
    marker = workdir / "weights.txt"
    state = None
    if marker.is_file() and Path(marker.read_text()).is_file():
        payload = load_weights(marker.read_text())
        cfg, state, source = config_from_dict(payload["config"]), payload["model"], "ray_train's weights"
    else:
        cfg, source = resolve_num_classes(cfg, val), "an untrained model"
    model = build_detector(apply_overrides(cfg, low))
    if state is not None:
        model.load_state_dict(state)
    model.to(device).eval()
    preds, on_device = [], True
    t0 = time.perf_counter()
    with torch.no_grad():
        for images, targets in DataLoader(val, batch_size=4, collate_fn=collate_fn):
            dets = model([im.to(device) for im in images])
            on_device &= all(d["boxes"].device.type == device.type for d in dets)
            preds += [{"image_id": int(t["image_id"]), **{k: d[k].cpu() for k in ("boxes", "scores", "labels")}}
                      for d, t in zip(dets, targets)]
    stats = coco_evaluate(val.coco, predictions_to_coco(preds, val.label_to_cat_id))
    n = sum(len(p["boxes"]) for p in preds)
    keys = {"AP", "AP50", "AP75", "AR100"}
    ok = keys <= stats.keys() and on_device and n > 0
    return ok, (f"{len(preds)} val images, {n} detections made on {device.type} ({on_device}) by {source}, "
                f"AP {stats.get('AP', float('nan')):.2f} AP50 {stats.get('AP50', float('nan')):.2f}, "
                f"AP keys {sorted(keys & stats.keys())}, {time.perf_counter() - t0:.1f}s")


CHECK_FUNCS: dict[str, Callable[[Mode, Any, Path, argparse.Namespace], tuple[bool, str]]] = {
    "retinanet_amp_step": check_retinanet_amp_step, "gfl_amp_step": check_gfl_amp_step, "ray_train": check_ray_train,
    "clb_nms": check_clb_nms, "coco_eval": check_coco_eval,
}


def run_child(name: str, mode: Mode, workdir: Path, opts: argparse.Namespace) -> int:
    """One check in this process: prints its CHECK line last; exit status 0 only if it passed."""
    import torch

    device = torch.device(mode.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick (both models alike)
    else:
        torch.set_num_threads(1)  # small CPU ops with several threads on a shared machine: noise, not speed
    try:
        ok, numbers = CHECK_FUNCS[name](mode, device, workdir, opts)
    except Exception as e:  # noqa: BLE001 - every failure becomes this check's FAIL line
        traceback.print_exc()
        ok, numbers = False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    print(CheckResult(name, ok, numbers).line(), flush=True)
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every check on CPU at tiny sizes (gloo, bf16 autocast, speed not gated): the code paths only")
    p.add_argument("--only", action="append", choices=CHECKS, default=[], help="run this check only (repeatable)")
    p.add_argument("--workdir", type=Path, default=None, help="logs, Ray storage (default: a new dir under /tmp)")
    p.add_argument("--min-step-ratio", type=float, default=0.80,
                   help="retinanet_amp_step: least ours/stock images/s (default 0.80)")
    p.add_argument("--max-nms-ratio", type=float, default=10.0,
                   help="clb_nms: most clb_nms/batched_nms time on CUDA (default 10; the CPU goal is 2.5)")
    p.add_argument("--child", choices=CHECKS, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = CPU_DRY if args.cpu_dry_run else GPU
    if args.child:
        return run_child(args.child, mode, args.workdir, args)
    if not args.cpu_dry_run and (message := _no_cuda_message()):
        print(message, file=sys.stderr, flush=True)
        return NO_CUDA_EXIT
    import torch

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="detlab-gpu-check-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # device_count() asks NVML and creates no CUDA context here: the checks get the whole GPU
    where = f"{torch.cuda.device_count()} CUDA device(s)" if mode.device == "cuda" else "CPU (dry run)"
    print(f"gpu_check: {where}, torch {torch.__version__} (CUDA {torch.version.cuda}), budget {mode.budget_s:.0f}s, "
          f"logs {workdir}", flush=True)
    child_opts = [f"--min-step-ratio={args.min_step_ratio}", f"--max-nms-ratio={args.max_nms_ratio}"]
    child_opts += ["--cpu-dry-run"] if args.cpu_dry_run else []
    t0 = time.monotonic()
    results = run_all(mode, args.only or list(CHECKS), workdir, child_opts)
    passed = sum(r.ok for r in results)
    print(f"gpu_check: {passed}/{len(results)} checks passed in {time.monotonic() - t0:.0f}s", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
