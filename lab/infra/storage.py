"""Where Ray Train/Tune state, checkpoints and final weights live: a storage URI every node reaches.

A storage URI (``--storage``) is one of:

* a local path (``/data/detlab``, ``results/ray``; made absolute): fine on one machine, refused on a
  Ray cluster whose nodes are on more than one host (:func:`refuse_local_on_multihost`);
* ``shared:///mnt/nfs/detlab``: a local path the user declares mounted at the same place on every
  node (NFS, EFS, a PVC), so the multi-host check lets it through;
* ``s3://bucket/prefix``: S3 or an S3-compatible store (MinIO, moto, Ceph). The endpoint comes from
  ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), credentials from the usual AWS chain
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``), the region from
  ``AWS_DEFAULT_REGION``/``AWS_REGION``. :data:`FORWARD_ENV` lists what the runner forwards to every
  Ray task and Train worker.

Ray reaches the store through pyarrow: :func:`ray_storage` gives ``RunConfig`` its
``storage_path`` and ``storage_filesystem``. The filesystem is built here, not by Ray's
``FileSystem.from_uri``, so the endpoint and region never depend on a bucket-region lookup on AWS.
Everything else (final weights, CL-B cells, ``detlab predict``, post-hoc sweeps) uses
:func:`upload_file` / :func:`download` / :func:`exists` on the same URIs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from detector.config import ConfigError

#: env vars that locate and authorise an S3-compatible store; forwarded to every cell task and worker.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL")
#: the prefix that declares a local path shared by every node of the cluster.
SHARED_PREFIX = "shared://"

_SCHEMES = ("s3", "shared", "file")


class StorageError(ConfigError):
    """A storage URI that cannot work (no bucket, unknown scheme, a local path across hosts)."""


@dataclass(frozen=True)
class StorageURI:
    """A parsed storage URI: ``kind`` is ``local`` or ``s3``; ``path`` an absolute local path or ``bucket/key``."""

    kind: str
    path: str
    shared: bool = False  #: local path declared mounted on every node (``shared://``)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.kind == "s3" else ""

    @property
    def key(self) -> str:
        return self.path.split("/", 1)[1] if self.kind == "s3" and "/" in self.path else ""

    @property
    def remote(self) -> bool:
        return self.kind == "s3"

    def __str__(self) -> str:
        if self.kind == "s3":
            return f"s3://{self.path}"
        return f"{SHARED_PREFIX}{self.path}" if self.shared else self.path


def from_pathlike(value: str | os.PathLike[str]) -> str:
    """``value`` as a URI string, undoing ``Path("s3://b/k")`` == ``s3:/b/k`` (Path folds the ``//``).

    Callers that wrapped a URI in ``Path`` still reach the right object; an absolute local path
    never starts with a scheme, so the repair is unambiguous.
    """
    text = os.fspath(value)
    for scheme in _SCHEMES:
        if text.startswith(f"{scheme}:/") and not text.startswith(f"{scheme}://"):
            return f"{scheme}://" + text[len(scheme) + 2:]
    return text


def parse(uri: str | os.PathLike[str] | StorageURI) -> StorageURI:
    """Parse and validate a storage URI (see the module docstring); raises :class:`StorageError`."""
    if isinstance(uri, StorageURI):
        return uri
    text = from_pathlike(uri).strip()
    if not text:
        raise StorageError("storage URI is empty; pass a local path, shared:///mount/path or s3://bucket/prefix")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme == "s3":
            parts = [p for p in rest.split("/") if p]
            if not parts or not rest or rest.startswith("/"):
                raise StorageError(f"storage URI {text!r} has no bucket: use s3://BUCKET/prefix")
            if any(p in (".", "..") for p in parts):
                raise StorageError(f"storage URI {text!r}: '.' and '..' are not allowed in an S3 key")
            return StorageURI("s3", "/".join(parts))
        if scheme in ("shared", "file"):
            if not rest.startswith("/"):
                raise StorageError(f"storage URI {text!r}: {scheme}:// takes an absolute path ({scheme}:///mnt/x)")
            return StorageURI("local", str(Path(rest).resolve()), shared=scheme == "shared")
        raise StorageError(f"storage URI {text!r}: unsupported scheme {scheme!r} (use a path, shared:///path or "
                           f"s3://bucket/prefix)")
    return StorageURI("local", str(Path(text).expanduser().resolve()))


def is_remote(uri: str | os.PathLike[str] | StorageURI) -> bool:
    """True for an object store (``s3://``), which every node reaches over the network."""
    return parse(uri).remote


def join(uri: str | os.PathLike[str] | StorageURI, *parts: str) -> str:
    """``uri`` with ``parts`` appended, as a URI string of the same kind."""
    u = parse(uri)
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if u.kind == "s3":
        return str(StorageURI("s3", "/".join([u.path, *clean])))
    return str(StorageURI("local", str(Path(u.path, *clean)), u.shared))


def is_under(uri: str | os.PathLike[str] | StorageURI, root: str | os.PathLike[str] | StorageURI) -> bool:
    """Whether ``uri`` names something inside the storage root ``root`` (or ``root`` itself).

    Both are compared as :func:`parse` leaves them: a local path with symlinks and ``..`` resolved
    (a link under the root to a file outside it is outside), an S3 key without ``..`` or empty
    parts, so a prefix match cannot be fooled. ``uri`` that is not a storage URI at all is not
    under anything; a bad ``root`` raises :class:`StorageError`.
    """
    r = parse(root)
    try:
        u = parse(uri)
    except StorageError:
        return False
    if u.kind != r.kind:
        return False
    if u.remote:
        return u.bucket == r.bucket and (not r.key or u.key == r.key or u.key.startswith(r.key + "/"))
    return Path(u.path).is_relative_to(r.path)


def local_path(uri: str | os.PathLike[str] | StorageURI) -> Path | None:
    """The local path of a local/shared URI, None for an object store."""
    u = parse(uri)
    return None if u.remote else Path(u.path)


def s3_filesystem() -> Any:
    """A ``pyarrow.fs.S3FileSystem`` from the standard AWS env vars (endpoint and region explicit).

    Credentials are left to the AWS SDK's default chain, so a pickled filesystem (Ray ships it to
    every worker inside ``RunConfig``) carries no secret; each process reads its own env.
    """
    from pyarrow import fs as pafs

    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if host:  # pyarrow wants the scheme apart from host:port
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        else:
            kwargs["endpoint_override"] = endpoint.rstrip("/")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # S3-compatible stores ignore it; without one pyarrow asks AWS
    return pafs.S3FileSystem(**kwargs)


def s3_client() -> Any:
    """A boto3 S3 client for the same store as :func:`s3_filesystem`, for what pyarrow cannot do:
    conditional writes (``If-None-Match``, ``If-Match``: the cell leases of :mod:`lab.execution.lease`)."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or ("us-east-1" if endpoint else None)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region)


def filesystem(uri: str | os.PathLike[str] | StorageURI) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for ``uri``."""
    from pyarrow import fs as pafs

    u = parse(uri)
    if u.remote:
        return s3_filesystem(), u.path
    return pafs.LocalFileSystem(), u.path


def ray_storage(uri: str | os.PathLike[str] | StorageURI) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: local paths go as they are
    (filesystem None, Ray's default), ``s3://`` as ``bucket/prefix`` on :func:`s3_filesystem`."""
    u = parse(uri)
    if u.remote:
        return u.path, s3_filesystem()
    return u.path, None


def mkdir(uri: str | os.PathLike[str] | StorageURI) -> None:
    """Create a local storage directory; no-op on an object store (no directories there)."""
    path = local_path(uri)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)


def exists(uri: str | os.PathLike[str] | StorageURI) -> bool:
    """Whether a file or directory (an S3 prefix with objects under it) exists at ``uri``."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound:
        return True
    if parse(uri).remote:  # a "directory" on S3 exists when some key is under it
        try:
            return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False)))
        except (FileNotFoundError, OSError):
            return False
    return False


def is_file(uri: str | os.PathLike[str] | StorageURI) -> bool:
    """Whether ``uri`` names an existing file (object)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def upload_file(local: str | os.PathLike[str], uri: str | os.PathLike[str] | StorageURI) -> str:
    """Copy the local file ``local`` to ``uri``; returns the URI. Atomic for readers (see
    :func:`upload_fileobj`)."""
    u = parse(uri)
    if not u.remote and Path(local).resolve() == Path(u.path):
        return str(u)
    with open(local, "rb") as src:
        return upload_fileobj(src, u)


def upload_fileobj(src: BinaryIO, uri: str | os.PathLike[str] | StorageURI) -> str:
    """Copy the readable binary stream ``src`` to ``uri``; returns the URI.

    Atomic for readers: the bytes go to a temporary name beside the target, which replaces the
    target only once the copy is complete (a local rename; on S3 a server-side copy). An error on
    the way leaves the previous target, or none, and deletes the temporary. pyarrow's S3 stream
    cannot abort: closed by an exception it still completes the upload, so writing to the target
    directly would publish a truncated object.
    """
    u = parse(uri)
    if not u.remote:
        dest = Path(u.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.part-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, length=8 * 1024 * 1024)
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return str(u)
    fs = s3_filesystem()
    tmp_key = f"{u.path}.part-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(tmp_key) as dst:
            shutil.copyfileobj(src, dst, length=8 * 1024 * 1024)
        fs.move(tmp_key, u.path)  # CopyObject then DeleteObject: readers see the old object or the new one
    except BaseException:
        try:
            fs.delete_file(tmp_key)
        except OSError:  # never created, or the store is down: an orphan .part key, never read
            pass
        raise
    return str(u)


def cache_dir() -> Path:
    """Where :func:`download` keeps copies: ``$DETLAB_STORAGE_CACHE``, else ``~/.cache/detlab/storage``."""
    return Path(os.environ.get("DETLAB_STORAGE_CACHE") or Path.home() / ".cache" / "detlab" / "storage")


#: days a cached copy stays after its last use (``$DETLAB_STORAGE_CACHE_DAYS``)
CACHE_DAYS = 7.0
#: an older version of an object that was fetched again goes once unused this long (a process may
#: still be reading it, or fetching it)
_SUPERSEDED_GRACE_S = 600.0


def prune_cache(cache: Path, keep: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove cached copies: those unused for ``$DETLAB_STORAGE_CACHE_DAYS`` (default
    :data:`CACHE_DAYS`), and older versions of ``keep``'s object unused for :data:`_SUPERSEDED_GRACE_S`.

    The cache holds ``<sha(uri)>/<sha(uri, size, mtime)>/<name>``: one directory per object, one per
    version of it under that. "Used" is the newest mtime in a version's directory (a cache hit
    touches the directory). Returns what was removed. Errors are ignored: another process may be
    pruning too.
    """
    now = time.time() if now is None else now
    max_age = float(os.environ.get("DETLAB_STORAGE_CACHE_DAYS") or CACHE_DAYS) * 86400.0
    removed: list[Path] = []
    try:
        objects = [d for d in cache.iterdir() if d.is_dir()]
    except OSError:
        return removed
    for obj in objects:
        superseded = keep is not None and obj == keep.parent
        try:
            versions = list(obj.iterdir())
        except OSError:  # pruned by another process meanwhile
            continue
        for version in versions:
            if keep is not None and version == keep:
                continue
            idle = now - _last_use(version, now)
            if idle > max_age or (superseded and idle > _SUPERSEDED_GRACE_S):
                if version.is_dir() and not version.is_symlink():
                    shutil.rmtree(version, ignore_errors=True)
                else:
                    version.unlink(missing_ok=True)
                removed.append(version)
        try:
            obj.rmdir()  # only when empty
        except OSError:
            pass
    return removed


def _last_use(path: Path, now: float) -> float:
    """Newest mtime of ``path`` and what is under it; ``now`` if a file comes or goes while we look
    (a download in progress renames its temp file: never prune what is in use)."""
    try:
        return max(p.stat().st_mtime for p in [path, *path.rglob("*")])
    except OSError:
        return now


def download(uri: str | os.PathLike[str] | StorageURI, cache: Path | None = None) -> Path:
    """A local path with the content of the file at ``uri``.

    A local/shared URI is returned as is (it must exist). An object is copied into the cache once
    per (URI, size, mtime), so re-reading the same weights costs nothing and a rewritten object is
    fetched again. Raises ``FileNotFoundError`` if there is no such file.
    """
    from pyarrow import fs as pafs

    u = parse(uri)
    if not u.remote:
        path = Path(u.path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return path
    fs = s3_filesystem()
    info = fs.get_file_info(u.path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such object: {u}")
    stamp = f"{u}|{info.size}|{info.mtime_ns}"
    root = cache or cache_dir()
    version = root / hashlib.sha256(str(u).encode()).hexdigest()[:20] / hashlib.sha256(stamp.encode()).hexdigest()[:20]
    dest = version / PurePosixPath(u.path).name
    if dest.is_file() and dest.stat().st_size == info.size:
        os.utime(version)  # used now (the file's own mtime stays: it says when it was fetched)
        prune_cache(root, keep=version)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(u.path) as src:
            shutil.copyfileobj(src, out, length=8 * 1024 * 1024)
        os.replace(tmp, dest)  # concurrent readers see the whole file or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    prune_cache(root, keep=version)
    return dest


# ---------------------------------------------------------------------------------------------
# Multi-host check


def node_hosts(nodes: Iterable[Mapping[str, Any]]) -> set[str]:
    """Distinct hosts among the alive nodes of ``ray.nodes()`` (by NodeManagerAddress, else hostname).

    Several nodes on one machine (``detlab cluster up``) share an address: one host.
    """
    hosts = set()
    for n in nodes:
        if not n.get("Alive", n.get("alive", True)):
            continue
        host = n.get("NodeManagerAddress") or n.get("node_ip") or n.get("NodeManagerHostname") or ""
        hosts.add(str(host))
    return hosts


def multihost_problem(uri: str | os.PathLike[str] | StorageURI, nodes: Iterable[Mapping[str, Any]]) -> str | None:
    """Why ``uri`` cannot serve a cluster with ``nodes`` (``ray.nodes()`` dicts), or None if it can.

    A pure function of its inputs (the unit tests give it fake node lists): a plain local path is
    refused once the alive nodes span more than one host, since each host would write and read
    its own disk (a CL-B cell or a resume on another node would not find the files).
    """
    u = parse(uri)
    if u.remote or u.shared:
        return None
    hosts = node_hosts(nodes)
    if len(hosts) <= 1:
        return None
    shown = ", ".join(sorted(hosts)[:5]) + (" ..." if len(hosts) > 5 else "")
    return (f"storage {u.path} is a local path, but the Ray cluster's nodes are on {len(hosts)} hosts ({shown}): "
            f"checkpoints and weights written on one node would be missing on the others. Pass --storage "
            f"s3://BUCKET/prefix (S3 or an S3-compatible store; AWS_ENDPOINT_URL and the AWS_* credentials are "
            f"forwarded to every node), or a shared mount declared as such: --storage {SHARED_PREFIX}{u.path} "
            f"(the same path on every node: NFS, EFS, a PVC)")


def refuse_local_on_multihost(uri: str | os.PathLike[str] | StorageURI, nodes: Iterable[Mapping[str, Any]] | None = None) -> None:
    """Raise :class:`StorageError` if ``uri`` is a plain local path and the cluster spans hosts.

    ``nodes`` defaults to ``ray.nodes()`` of the connected cluster; call it before launching anything.
    """
    if nodes is None:
        if not parse(uri).remote and not parse(uri).shared:
            import ray

            nodes = ray.nodes()
        else:
            nodes = []
    problem = multihost_problem(uri, nodes)
    if problem:
        raise StorageError(problem)
