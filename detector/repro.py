"""Bit-reproducible training on one kind of machine: thread counts, deterministic kernels, seeds.

What changes float results on CPU (``../shared/notes/reproducibility.md``): the intra-op thread
count (reductions split into that many partial sums), threading runtimes that change the count on
their own (``OMP_DYNAMIC``/``MKL_DYNAMIC``, which must be set before torch is imported: the
platform sets them in every worker's environment, ``lab.execution.workerenv.DETERMINISM_ENV``), kernels without a deterministic implementation, and the data order and
augmentation draws. With a fixed thread count, :func:`set_determinism` and the seeded loader pieces
below, the same command and seed give byte-identical weights on the same kind of machine.

What this cannot fix: another CPU model or instruction set (MKL/oneDNN pick code paths per CPU),
another torch build, another world size (another effective batch and another all-reduce sum).
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch

def set_determinism(threads: int, deterministic: bool = True) -> None:
    """Fix this process's intra-op thread count and (``deterministic``) ask torch for deterministic
    kernels: ``torch.use_deterministic_algorithms`` (warn-only, since on CUDA some detection ops,
    e.g. ``roi_align``'s backward, have none; on CPU the ops used here all do) and no cuDNN autotuning.
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (the augmentations draw from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    """The generator a ``DataLoader`` draws its worker seeds from (one per epoch, in order)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def seed_loader_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: torch seeds each loader worker from the loader's
    generator, but not numpy or ``random``; seed those from it too, so no two workers (or epochs)
    draw the same numbers."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def serialize(obj: object) -> bytes:
    """``torch.save`` bytes of ``obj`` that depend on ``obj`` only: saved to a file, torch names the
    archive's top folder after the file, so the same weights saved under two names differ."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


__all__ = ["serialize", "loader_generator", "seed_everything", "seed_loader_worker", "set_determinism"]
