"""Which checkpoint a restarted Train run resumes from.

Ray Train registers a checkpoint some time after the worker has copied it into storage: the
controller polls the workers, then records it in its state snapshot. A driver killed inside that
window leaves a complete, newer checkpoint that ``ray.train.get_checkpoint()`` does not return
(seen in CI: epoch 3 uploaded, epoch 2 registered). A failed copy (full disk, node lost
mid-upload) leaves a half-written one. Ray deletes neither (``num_to_keep`` only rotates
registered checkpoints).

Every detlab checkpoint therefore carries a small meta file (:data:`META_FILE`) with its epoch, its
state file's size and sha256; :func:`choose_resume_checkpoint` resumes from the newest *complete*
checkpoint of the run, registered or not, and names the others for deletion.

Only "not found" and an unparsable meta file mean incomplete. Any other error reading the store
(an S3 503 or SlowDown, a timeout, a stale NFS handle) raises :class:`CheckpointReadError`: the
resume stops and nothing is deleted, since a transient error would otherwise turn a complete
checkpoint into "half-written" and remove it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

STATE_FILE = "state.pt"
META_FILE = "detlab_checkpoint.json"
_PREFIX = "checkpoint_"


class CheckpointReadError(OSError):
    """Reading a checkpoint (or the run's listing) failed for a reason other than "not there"."""


#: bytes per read when hashing a state file (150 MB for R-50)
_CHUNK = 8 * 1024 * 1024


def write_checkpoint_meta(directory: str | Path, epoch: int) -> None:
    """Write :data:`META_FILE` beside ``directory/state.pt`` (call after the state is saved).

    ``epoch`` is 0-based (the epoch just finished). The recorded size lets a resume tell a complete
    copy from a truncated one without loading the state; the sha256 lets the loop verify a
    checkpoint Ray never registered before trusting it (:func:`verify_checkpoint`).
    """
    d = Path(directory)
    digest = hashlib.sha256()
    with open(d / STATE_FILE, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    meta = {"epoch": int(epoch), "state_bytes": (d / STATE_FILE).stat().st_size, "state_sha256": digest.hexdigest()}
    (d / META_FILE).write_text(json.dumps(meta))


def _read_meta(fs: pafs.FileSystem, path: str) -> dict | None:
    """The parsed meta file of checkpoint ``path``; None when it is missing or unparsable.

    Raises :class:`CheckpointReadError` for every other failure: it says nothing about the checkpoint.
    """
    meta_path = f"{path}/{META_FILE}"
    try:
        if fs.get_file_info(meta_path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(meta_path) as f:
            raw = f.read()
    except FileNotFoundError:  # deleted between the two calls
        return None
    except OSError as e:
        raise CheckpointReadError(f"could not read {meta_path} ({type(e).__name__}: {e}); not resuming, and no "
                                  f"checkpoint was deleted: rerun once the store answers") from e
    try:
        meta = json.loads(raw.decode())
        int(meta["epoch"]), int(meta["state_bytes"])
    except (ValueError, KeyError, TypeError):  # a torn write of the meta file: incomplete
        return None
    return meta


def complete_checkpoint_epoch(fs: pafs.FileSystem, path: str) -> int | None:
    """The 0-based epoch of the checkpoint directory ``path`` on ``fs`` if it is complete, else None.

    Complete = its meta file parses and its state file has exactly the recorded size. A checkpoint
    written before meta files existed counts as incomplete. Raises :class:`CheckpointReadError`
    when the store fails (anything but "not found").
    """
    meta = _read_meta(fs, path)
    if meta is None:
        return None
    try:
        info = fs.get_file_info(f"{path}/{STATE_FILE}")
    except OSError as e:
        raise CheckpointReadError(f"could not stat {path}/{STATE_FILE} ({type(e).__name__}: {e}); not resuming, "
                                  f"and no checkpoint was deleted: rerun once the store answers") from e
    if info.type != pafs.FileType.File or info.size != int(meta["state_bytes"]):
        return None
    return int(meta["epoch"])


def verify_checkpoint(fs: pafs.FileSystem, path: str) -> bool:
    """Whether the state file of checkpoint ``path`` has the sha256 its meta file records (True
    when the meta predates checksums). Reads the whole state; raises :class:`CheckpointReadError`
    when the store fails."""
    meta = _read_meta(fs, path)
    if meta is None:
        return False
    expected = meta.get("state_sha256")
    if not expected:
        return True
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CheckpointReadError(f"could not read {path}/{STATE_FILE} ({type(e).__name__}: {e}); not resuming, "
                                  f"and no checkpoint was deleted: rerun once the store answers") from e
    return digest.hexdigest() == expected


@dataclass(frozen=True)
class ResumeChoice:
    """What :func:`choose_resume_checkpoint` decided for one run directory.

    ``path``: the checkpoint directory to resume from (None = start from epoch 0).
    ``epoch``: its 0-based epoch (None when unknown: a registered checkpoint without meta file).
    ``adopted``: ``path`` is complete but not registered with Ray. Ray never deletes it, so the
    loop does, once a newer checkpoint has been written.
    ``remove``: the run's other checkpoint directories, half-written or superseded.
    ``registered_epoch``: the 0-based epoch of Ray's registered checkpoint (None: none, or no meta file).
    ``registered``: the registered checkpoint's directory on this store (None: none registered).
    """

    path: str | None
    epoch: int | None
    adopted: bool
    remove: tuple[str, ...]
    registered_epoch: int | None = None
    registered: str | None = None

    def fall_back(self) -> ResumeChoice:
        """The registered checkpoint instead of the adopted ``path``, which failed verification
        (it joins ``remove``: its bytes are not what was written)."""
        assert self.adopted and self.path is not None
        return ResumeChoice(self.registered, self.registered_epoch, False, (*self.remove, self.path),
                            self.registered_epoch, self.registered)


def choose_resume_checkpoint(fs: pafs.FileSystem, run_dir: str, registered: str | None) -> ResumeChoice:
    """Pick the newest complete checkpoint under ``run_dir`` (a path on ``fs``).

    ``registered`` is the path of the checkpoint Ray restored (``get_checkpoint()``), or None. It is
    kept whatever its state, unless a complete checkpoint of a later epoch exists: Ray has
    verified the registered one, and older detlab checkpoints have no meta file. Every other
    ``checkpoint_*`` directory is either the chosen one or listed in ``remove``. Directories are
    matched by base name, so ``registered`` and ``run_dir`` may come from different filesystem
    handles for the same store. Raises :class:`CheckpointReadError` if the store fails.
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir.rstrip("/"), allow_not_found=True))
    except OSError as e:  # not "no checkpoints": that would restart the run at epoch 0
        raise CheckpointReadError(f"could not list {run_dir} ({type(e).__name__}: {e}); not resuming, and no "
                                  f"checkpoint was deleted: rerun once the store answers") from e
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
    return ResumeChoice(keep, epoch, adopted, remove, reg_epoch, reg_path)


def remove_checkpoints(fs: pafs.FileSystem, paths: tuple[str, ...] | list[str], name: str, why: str) -> None:
    """Delete checkpoint directories, saying which and why (a missing one is skipped). Housekeeping:
    a store error is printed, not raised, so it never fails the attempt that trains."""
    for p in paths:
        try:
            fs.delete_dir(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            print(f"[{name}] could not remove {p} ({type(e).__name__}: {e}); it stays until the next resume",
                  flush=True)
            continue
        print(f"[{name}] removed {p}: {why}", flush=True)

