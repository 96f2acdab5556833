"""What produced a run, as MLflow tags: the code, the libraries, the machine, the thread count, the
data and the weights.

Two halves, because they are known in different places:

* :func:`source_tags` (the driver): the git commit as MLflow's own ``mlflow.source.git.commit``
  (the UI shows it on the run page), whether the checkout had uncommitted changes, and a digest
  of the source files, which identifies the code even where there is no ``.git``;
* :func:`machine_tags` (the worker that trained): library versions, CPU model and the instruction
  set torch dispatches to, intra-op threads, the GPU.

The commit is found without trusting the environment to have ``git`` or ``.git``:
``DETLAB_GIT_COMMIT`` (code shipped without either, e.g. an image), else ``git rev-parse HEAD``,
else ``.git/HEAD`` read directly, else the source stamp. ``ray job submit --working-dir .`` never
uploads ``.git`` (Ray 2.60 excludes it by default, ``RAY_RUNTIME_ENV_DEFAULT_EXCLUDES``), so
``make`` installs git hooks (:func:`install_git_hooks`) that keep :data:`STAMP_FILE` current after
every commit, checkout, merge and rebase: the commit and the source digest of that commit's files.
The stamp is excluded from git (``.git/info/exclude``) but not from Ray's upload, so a submitted job
reads the commit from it, and is dirty exactly when its code's digest is not the stamp's.

Run as a script (``python lab/records/provenance.py --stamp`` / ``--install-hooks``) it imports nothing
but the standard library, so a git hook can call it with any Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

#: the repository root (the directory above ``lab/``); workers chdir elsewhere, so never the cwd
REPO_ROOT = Path(__file__).resolve().parents[2]
#: MLflow's own tag for the commit (the run page shows it)
TAG_COMMIT = "mlflow.source.git.commit"
TAG_DIRTY = "detlab.git_dirty"
TAG_SOURCE_DIGEST = "detlab.source_digest"
#: prefix of the machine and library tags (``detlab.env.torch``, ``detlab.env.cpu``, ...)
ENV_PREFIX = "detlab.env."
#: the sha256 of the pretrained backbone file a cell started from
TAG_BACKBONE_SHA = "detlab.weights_backbone_sha256"
#: prefix of the data digests (``detlab.data_digest.train`` / ``.val``): :func:`detector.digest.records_digest`
DATA_DIGEST_PREFIX = "detlab.data_digest."
#: what the source digest covers: the code that decides a run's numbers and the profiles
SOURCE_DIRS = ("detector", "lab", "jobs")
SOURCE_SUFFIXES = (".py", ".yaml")
LIBRARIES = ("torch", "torchvision", "ray", "mlflow", "numpy", "pycocotools", "faster-coco-eval")


#: the commit and its source digest, kept current by the hooks; read where .git did not travel
STAMP_FILE = ".detlab-source.json"
_HOOKS = ("post-commit", "post-checkout", "post-merge", "post-rewrite")
_HOOK_MARK = "# detlab: keeps .detlab-source.json current (lab/records/provenance.py)"


def _git(args: list[str], root: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _read_stamp(root: Path) -> dict[str, str] | None:
    try:
        data = json.loads((root / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"commit", "source_digest"} <= data.keys() else None


def _files_digest(files: list[tuple[str, bytes]]) -> str:
    """:func:`source_digest`'s formula over ``(relative posix path, bytes)`` pairs."""
    h = hashlib.sha256()
    for rel, blob in sorted(files):
        h.update(rel.encode() + b"\0" + blob + b"\0")
    return h.hexdigest()[:16]


def write_stamp(root: Path = REPO_ROOT) -> dict[str, str] | None:
    """Write :data:`STAMP_FILE`: HEAD's commit and the source digest of HEAD's own files (from git's
    objects, so a dirty working tree does not leak into it). None (nothing written) without git."""
    commit = (_git(["rev-parse", "HEAD"], root) or "").strip()
    listing = _git(["ls-tree", "-r", "--name-only", "HEAD", "--", *SOURCE_DIRS], root)
    if not commit or listing is None:
        return None
    names = [n for n in listing.splitlines() if n.endswith(SOURCE_SUFFIXES)]
    files = []
    for name in names:
        blob = subprocess.run(["git", "show", f"HEAD:{name}"], cwd=root, capture_output=True, timeout=10).stdout
        files.append((name, blob))
    stamp = {"commit": commit, "source_digest": _files_digest(files)}
    tmp = root / f"{STAMP_FILE}.tmp"
    tmp.write_text(json.dumps(stamp))
    tmp.replace(root / STAMP_FILE)
    return stamp


def install_git_hooks(root: Path = REPO_ROOT) -> list[str]:
    """Install the hooks that keep the stamp current (a hook someone else wrote is left alone), keep
    the stamp out of ``git status`` (``.git/info/exclude``) and write it now; returns the hooks
    installed or already ours."""
    git_dir = (_git(["rev-parse", "--absolute-git-dir"], root) or "").strip()
    if not git_dir:
        return []
    hooks, ours = Path(git_dir) / "hooks", []
    hooks.mkdir(parents=True, exist_ok=True)
    script = f'#!/bin/sh\n{_HOOK_MARK}\ntop=$(git rev-parse --show-toplevel) && python3 "$top/lab/records/provenance.py" --stamp >/dev/null 2>&1\nexit 0\n'
    for name in _HOOKS:
        hook = hooks / name
        if hook.exists() and _HOOK_MARK not in hook.read_text(errors="replace"):
            print(f"detlab: {hook} exists and is not ours; left alone (the source stamp may go stale)")
            continue
        hook.write_text(script)
        hook.chmod(0o755)
        ours.append(name)
    exclude = Path(git_dir) / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if f"/{STAMP_FILE}" not in lines:
        exclude.write_text("\n".join([*lines, f"/{STAMP_FILE}"]) + "\n")
    write_stamp(root)
    return ours


def _read_head(root: Path) -> str | None:
    """The commit ``.git/HEAD`` names, read without ``git`` (a loose or packed ref, or a detached sha)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        loose = git / ref
        if loose.is_file():
            return loose.read_text().strip() or None
        for line in (git / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        return None
    return None


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """``DETLAB_GIT_COMMIT``, else ``git rev-parse HEAD`` in ``root``, else ``.git/HEAD`` read
    directly, else the commit of the source stamp (a ``ray job submit`` working dir)."""
    env = os.environ.get("DETLAB_GIT_COMMIT", "").strip()
    if env:
        return env
    out = _git(["rev-parse", "HEAD"], root)
    found = out.strip() if out and out.strip() else _read_head(root)
    if found:
        return found
    stamp = _read_stamp(root)
    return stamp["commit"] if stamp else None


def git_dirty(root: Path = REPO_ROOT) -> str:
    """``"true"`` when tracked files differ from the commit, ``"false"`` when not (``git status``;
    without git: whether the code's digest is the stamp's), ``"unknown"`` when neither can tell
    (``DETLAB_GIT_DIRTY`` overrides)."""
    env = os.environ.get("DETLAB_GIT_DIRTY", "").strip().lower()
    if env in ("true", "false"):
        return env
    out = _git(["status", "--porcelain", "--untracked-files=no"], root)
    if out is not None:
        return "true" if out.strip() else "false"
    stamp = _read_stamp(root)
    if stamp is None or os.environ.get("DETLAB_GIT_COMMIT"):
        return "unknown"
    return "false" if stamp["source_digest"] == source_digest(root) else "true"


def source_digest(root: Path = REPO_ROOT) -> str:
    """16 hex digits of a sha256 over the relative path and bytes of every ``.py``/``.yaml`` file under
    :data:`SOURCE_DIRS`, in sorted order: the same code gives the same digest with or without git."""
    files = [p for d in SOURCE_DIRS if (root / d).is_dir() for p in (root / d).rglob("*")
             if p.suffix in SOURCE_SUFFIXES and p.is_file() and "__pycache__" not in p.parts]
    return _files_digest([(p.relative_to(root).as_posix(), p.read_bytes()) for p in files])


@lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """The driver's code tags: commit (MLflow's and detlab's tag), dirty flag, source digest."""
    tags = {TAG_DIRTY: git_dirty(), TAG_SOURCE_DIGEST: source_digest()}
    commit = git_commit()
    if commit:
        tags[TAG_COMMIT] = commit
        tags["detlab.git_commit"] = commit
    return tags


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` and Python (from the package metadata: no imports)."""
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_tags(threads: int | None = None) -> dict[str, str]:
    """``detlab.env.*`` tags of this process: library versions, CPU model, the ISA level torch
    dispatches to (``torch.backends.cpu.get_cpu_capability()``), CPUs usable, intra-op threads,
    host and GPU. Imports torch."""
    import torch

    tags = {f"{ENV_PREFIX}{k}": v for k, v in library_versions().items()}
    tags.update({
        f"{ENV_PREFIX}cpu": cpu_model(),
        f"{ENV_PREFIX}cpu_capability": torch.backends.cpu.get_cpu_capability(),
        f"{ENV_PREFIX}cpus_usable": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count()),
        f"{ENV_PREFIX}threads": str(torch.get_num_threads() if threads is None else threads),
        f"{ENV_PREFIX}host": socket.gethostname(),
        f"{ENV_PREFIX}torch_cuda": str(torch.version.cuda),
    })
    if torch.cuda.is_available():
        tags[f"{ENV_PREFIX}gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return tags


__all__ = ["DATA_DIGEST_PREFIX", "ENV_PREFIX", "REPO_ROOT", "STAMP_FILE", "install_git_hooks", "write_stamp", "TAG_BACKBONE_SHA", "TAG_COMMIT", "TAG_DIRTY",
           "TAG_SOURCE_DIGEST", "cpu_model", "git_commit", "git_dirty", "library_versions", "machine_tags",
           "source_digest", "source_tags"]


if __name__ == "__main__":  # the git hooks' entry point: standard library only
    import sys

    root = Path(__file__).resolve().parents[2]
    if sys.argv[1:] == ["--stamp"]:
        write_stamp(root)
    elif sys.argv[1:] == ["--install-hooks"]:
        print(f"detlab: git hooks {', '.join(install_git_hooks(root)) or '(none: not a git checkout)'} keep "
              f"{STAMP_FILE} current (the commit of `ray job submit` runs)")
    else:
        sys.exit("usage: python lab/records/provenance.py --stamp | --install-hooks")
