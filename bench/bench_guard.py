"""What the non-finite-loss guard costs a DDP training step (its per-step all-reduce of one flag).

Two gloo processes train the same DDP detector (R-18, 256 px, batch 2 per rank, 1 thread each);
steps alternate between "guard on" (``NonFiniteGuard.check``: ``isfinite`` plus the MIN all-reduce
that makes every rank skip together) and "guard off" (no check), so machine noise hits both alike.
Prints the ratio of median step times (on/off) and the median time of the flag all-reduce alone.
Usage: python bench/bench_guard.py [--steps 16] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.bench_train_step import make_batch
from detector.config import DetectorConfig, apply_overrides
from detector.model import build_detector
from lab.execution.worker import NonFiniteGuard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = apply_overrides(DetectorConfig(), {"model.backbone": "resnet18", "model.num_classes": 5,
                                             "model.min_size": args.size, "model.max_size": args.size,
                                             "assign.iac": True, "loss.dc": True})
    model = torch.nn.parallel.DistributedDataParallel(build_detector(cfg).train())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images, targets = make_batch(args.size, 2, seed=rank)
    guard = NonFiniteGuard(limit=3)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.steps * 2 + 2):
        on = i % 2 == args.on_first_of_pair_parity
        dist.barrier()
        t0 = time.perf_counter()
        parts = model(images, targets)
        loss = sum(parts.values())
        ok = True
        if on:
            loss, ok = guard.check(loss, parts, i + 1, 0, i, world)
        if ok:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if i >= 2:  # the first pair warms up
            times[on].append(time.perf_counter() - t0)
    flag = torch.ones(1)
    reduce_s = []
    for _ in range(200):
        t0 = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        reduce_s.append(time.perf_counter() - t0)
    if rank == 0:
        out.update(on=statistics.median(times[True]), off=statistics.median(times[False]),
                   reduce=statistics.median(reduce_s))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--guard-second", action="store_true", help="run the guarded step second in each pair (order check)")
    args = ap.parse_args()
    args.on_first_of_pair_parity = 1 if args.guard_second else 0
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
        r = dict(out)
    print(f"DDP step, 2 gloo ranks, R-18 {args.size}px, batch 2/rank, {args.steps} steps each: "
          f"guard on {r['on'] * 1e3:.0f} ms, off {r['off'] * 1e3:.0f} ms, ratio {r['on'] / r['off']:.3f}; "
          f"the flag all-reduce alone {r['reduce'] * 1e6:.0f} us ({r['reduce'] / r['off'] * 100:.3f}% of a step)")


if __name__ == "__main__":
    main()
