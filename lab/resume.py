"""Which checkpoint a restarted Train run resumes from.

Ray Train registers a checkpoint some time after the worker has copied it into storage: the
controller polls the workers, then records it in its state snapshot. A driver killed inside that
window leaves a complete, newer checkpoint that ``ray.train.get_checkpoint()`` does not return
(seen in CI: epoch 3 uploaded, epoch 2 registered). A failed copy (full disk, node lost
mid-upload) leaves a half-written one. Ray deletes neither (``num_to_keep`` only rotates
registered checkpoints).

Every detlab checkpoint therefore carries a small meta file (:data:`META_FILE`) with its epoch and
its state file's size; :func:`choose_resume_checkpoint` resumes from the newest *complete*
checkpoint of the run, registered or not, and names the others for deletion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

STATE_FILE = "state.pt"
META_FILE = "detlab_checkpoint.json"
_PREFIX = "checkpoint_"


def write_checkpoint_meta(directory: str | Path, epoch: int) -> None:
    """Write :data:`META_FILE` beside ``directory/state.pt`` (call after the state is saved).

    ``epoch`` is 0-based (the epoch just finished). The recorded size lets a resume tell a complete
    copy from a truncated one without loading the state (150 MB for R-50).
    """
    d = Path(directory)
    meta = {"epoch": int(epoch), "state_bytes": (d / STATE_FILE).stat().st_size}
    (d / META_FILE).write_text(json.dumps(meta))


def complete_checkpoint_epoch(fs: pafs.FileSystem, path: str) -> int | None:
    """The 0-based epoch of the checkpoint directory ``path`` on ``fs`` if it is complete, else None.

    Complete = its meta file parses and its state file has exactly the recorded size. A checkpoint
    written before meta files existed counts as incomplete.
    """
    try:
        with fs.open_input_stream(f"{path}/{META_FILE}") as f:
            meta = json.loads(f.read().decode())
        info = fs.get_file_info(f"{path}/{STATE_FILE}")
        epoch, size = int(meta["epoch"]), int(meta["state_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.type != pafs.FileType.File or info.size != size:
        return None
    return epoch


@dataclass(frozen=True)
class ResumeChoice:
    """What :func:`choose_resume_checkpoint` decided for one run directory.

    ``path``: the checkpoint directory to resume from (None = start from epoch 0).
    ``epoch``: its 0-based epoch (None when unknown: a registered checkpoint without meta file).
    ``adopted``: ``path`` is complete but not registered with Ray. Ray never deletes it, so the
    loop does, once a newer checkpoint has been written.
    ``remove``: the run's other checkpoint directories, half-written or superseded.
    ``registered_epoch``: the 0-based epoch of Ray's registered checkpoint (None: none, or no meta file).
    """

    path: str | None
    epoch: int | None
    adopted: bool
    remove: tuple[str, ...]
    registered_epoch: int | None = None


def choose_resume_checkpoint(fs: pafs.FileSystem, run_dir: str, registered: str | None) -> ResumeChoice:
    """Pick the newest complete checkpoint under ``run_dir`` (a path on ``fs``).

    ``registered`` is the path of the checkpoint Ray restored (``get_checkpoint()``), or None. It is
    kept whatever its state, unless a complete checkpoint of a later epoch exists: Ray has
    verified the registered one, and older detlab checkpoints have no meta file. Every other
    ``checkpoint_*`` directory is either the chosen one or listed in ``remove``. Directories are
    matched by base name, so ``registered`` and ``run_dir`` may come from different filesystem
    handles for the same store.
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir.rstrip("/"), allow_not_found=True))
    except OSError:
        infos = []
    dirs = sorted(i.path.rstrip("/") for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith(_PREFIX))
    reg_name = registered.rstrip("/").rsplit("/", 1)[-1] if registered else None
    reg_path = next((d for d in dirs if d.rsplit("/", 1)[-1] == reg_name), registered)
    reg_epoch = complete_checkpoint_epoch(fs, reg_path) if reg_path else None

    best, best_epoch = None, -1 if reg_epoch is None else reg_epoch
    for d in dirs:
        if d == reg_path:
            continue
        e = complete_checkpoint_epoch(fs, d)
        if e is not None and e > best_epoch:
            best, best_epoch = d, e
    if best is None:
        keep, epoch, adopted = reg_path, reg_epoch, False
    else:
        keep, epoch, adopted = best, best_epoch, True
    remove = tuple(d for d in dirs if d != keep and d != reg_path)
    return ResumeChoice(keep, epoch, adopted, remove, reg_epoch)


def remove_checkpoints(fs: pafs.FileSystem, paths: tuple[str, ...] | list[str], name: str, why: str) -> None:
    """Delete checkpoint directories, saying which and why (a missing one is skipped)."""
    for p in paths:
        try:
            fs.delete_dir(p)
        except FileNotFoundError:
            continue
        print(f"[{name}] removed {p}: {why}", flush=True)

