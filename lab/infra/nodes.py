"""Where a cell's Train workers ran: every rank's Ray node id, tagged on the cell's run (``detlab.node_ids``).

Called at the end of :mod:`lab.execution.loop`'s loop by every rank (a collective).
"""

from __future__ import annotations

from typing import Any

#: MLflow tag with the Ray node ids of a cell's Train workers (rank order, comma-separated).
TAG_NODE_IDS = "detlab.node_ids"


def gather_node_ids(world: int) -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: every rank of a DDP group calls it).

    One process (local mode, a Tune trial): this process's node, or ``[]`` outside Ray.
    """
    import ray

    mine = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        out: list[Any] = [None] * world
        dist.all_gather_object(out, mine)
        return [str(x) for x in out]
    return [mine] if mine else []


def log_node_ids(tracking_uri: str | None, run_id: str | None, world: int, rank: int) -> list[str]:
    """Gather the ranks' node ids (every rank calls this); rank 0 tags the run with them
    (:data:`TAG_NODE_IDS`). A tracking server that does not answer costs a warning, not the cell."""
    ids = gather_node_ids(world)
    if rank == 0 and tracking_uri and run_id and ids:
        tag_node_ids(tracking_uri, run_id, ids)
    return ids


def tag_node_ids(tracking_uri: str, run_id: str, ids: list[str]) -> None:
    """Tag ``run_id`` with ``ids``; a failure is printed (secrets masked: MLflow's errors quote the
    URL, ``user:password@`` included), not raised: a missing tag must not fail a trained cell."""
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri).set_tag(run_id, TAG_NODE_IDS, ",".join(ids))
    except Exception as e:  # noqa: BLE001
        from lab.settings.scrub import scrub_text

        print(f"detlab: could not tag {run_id} with its node ids ({scrub_text(f'{type(e).__name__}: {e}')})",
              flush=True)
