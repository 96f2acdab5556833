"""Classification-Localization balanced NMS (CL-B NMS, paper eq. 6-7).

Readings of the paper that it leaves open (ours; config keys in ``NmsConfig``):

* A cluster is what class-wise greedy NMS merges: the leaders are
  ``batched_nms(boxes, scores, labels, iou_threshold)`` and every box belongs to the first leader
  (in that order) of its own class with ``IoU > iou_threshold`` (a leader to itself).
* eq. 6's weights are the softmax of the members' *logits* for their class.
* eq. 7's ``dis`` must fall with distance (a raw distance would reward outliers), so it is the
  bounded similarity ``dis_j = max(0, 1 - |c_j - c0|^2 / (w_j^2 + h_j^2))`` normalised by box j's
  own diagonal, and weighted: ``s_j = score_j + beta * dis_j``.
* One box per cluster is kept: the member with the largest ``s`` (the leader on ties). The reported
  detection score stays ``score_j``: COCO AP ranks by it, and ``s`` is a selection criterion.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms


def nms_clusters(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """Leaders of class-wise greedy NMS and the cluster of every box.

    Args:
        boxes: Tensor[K, 4] ``x1, y1, x2, y2``; scores: Tensor[K]; labels: LongTensor[K].
    Returns:
        leaders: LongTensor[L], indices of the kept boxes in ``batched_nms`` order (score desc).
        cluster: LongTensor[K], for each box the position in ``leaders`` of its cluster's leader.
    """
    num = boxes.shape[0]
    leaders = batched_nms(boxes, scores, labels, iou_threshold)
    cluster = torch.empty(num, dtype=torch.int64, device=boxes.device)
    if num == 0:
        return leaders, cluster

    # A leader is its own cluster; only suppressed boxes need a search. Enumerate the (suppressed
    # box, leader of the same class) pairs without a Python loop: group the leaders by class
    # (stable, so within a class they stay in NMS order) and give each box the block of its class.
    # The pair count is sum_c |suppressed_c| * |leaders_c|, far below K * L with many classes.
    cluster[leaders] = torch.arange(leaders.numel(), device=boxes.device)
    is_leader = torch.zeros(num, dtype=torch.bool, device=boxes.device)
    is_leader[leaders] = True
    members = torch.where(~is_leader)[0]
    if members.numel() == 0:
        return leaders, cluster
    if int(labels.min()) >= 0 and int(labels.max()) < 4 * num:
        label_ids = labels  # class indices already: skip unique()'s sort
    else:
        label_ids = torch.unique(labels, return_inverse=True)[1]
    leader_cls = label_ids[leaders]
    order = torch.sort(leader_cls, stable=True).indices  # positions in `leaders`, grouped by class
    per_cls = torch.bincount(leader_cls, minlength=int(label_ids.max()) + 1)
    start = torch.cumsum(per_cls, 0) - per_cls
    member_cls = label_ids[members]
    counts = per_cls[member_cls]  # leaders in each suppressed box's class
    pair_member = torch.repeat_interleave(torch.arange(members.numel(), device=boxes.device), counts)
    pair_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    within = torch.arange(pair_member.numel(), device=boxes.device) - pair_start
    leader_pos = order.index_select(0, start.index_select(0, member_cls.index_select(0, pair_member)) + within)
    # Overlap test as inter > t * union (no division), on column-gathered coordinates: cheaper
    # than row gathers of [P, 4] on CPU.
    cols = boxes.t().contiguous()
    area = (cols[2] - cols[0]) * (cols[3] - cols[1])
    ia = members.index_select(0, pair_member)
    ib = leaders.index_select(0, leader_pos)
    a, b = cols.index_select(1, ia), cols.index_select(1, ib)
    iw = (torch.min(a[2], b[2]) - torch.max(a[0], b[0])).clamp(min=0)
    ih = (torch.min(a[3], b[3]) - torch.max(a[1], b[1])).clamp(min=0)
    inter = iw * ih
    union = area.index_select(0, ia) + area.index_select(0, ib) - inter

    # First leader (lowest position) with IoU > threshold.
    n_mem = members.numel()
    big = torch.iinfo(torch.int64).max
    cand = torch.where(inter > iou_threshold * union, leader_pos, torch.full_like(leader_pos, big))
    first = torch.full((n_mem,), big, dtype=torch.int64, device=boxes.device)
    first.scatter_reduce_(0, pair_member, cand, reduce="amin")
    # The kernel in batched_nms computes IoU in its own float order; a box it suppressed at exactly
    # the threshold may miss every leader here. Give such boxes their highest-IoU leader.
    orphan = first == big
    if bool(orphan.any()):
        iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))
        best = torch.full((n_mem,), -1.0, dtype=iou.dtype, device=boxes.device)
        best.scatter_reduce_(0, pair_member, iou, reduce="amax")
        is_best = (iou == best[pair_member]) & orphan[pair_member]
        cand = torch.where(is_best, leader_pos, torch.full_like(leader_pos, big))
        fallback = torch.full((n_mem,), big, dtype=torch.int64, device=boxes.device)
        fallback.scatter_reduce_(0, pair_member, cand, reduce="amin")
        first = torch.where(orphan, fallback, first)
    cluster[members] = first
    return leaders, cluster


def cluster_center(centers: Tensor, logits: Tensor, cluster: Tensor, num_clusters: int) -> Tensor:
    """Softmax-weighted centre of each cluster, paper eq. 6.

    ``c0_k = sum_{j in k} softmax(f)_j * c_j`` with the softmax taken over the members' logits.

    Args:
        centers: Tensor[K, 2] box centres (x, y) in pixels.
        logits: Tensor[K] classification logits of the boxes for their class.
        cluster: LongTensor[K] cluster index of each box in ``[0, num_clusters)``.
    Returns:
        Tensor[num_clusters, 2].
    """
    logits = logits.to(centers.dtype)
    peak = torch.full((num_clusters,), float("-inf"), dtype=logits.dtype, device=logits.device)
    peak.scatter_reduce_(0, cluster, logits, reduce="amax")
    e = torch.exp(logits - peak[cluster])
    denom = torch.zeros(num_clusters, dtype=e.dtype, device=e.device).index_add_(0, cluster, e)
    w = e / denom[cluster]
    return torch.zeros(num_clusters, 2, dtype=centers.dtype, device=centers.device).index_add_(
        0, cluster, w[:, None] * centers
    )


def clb_selection_score(boxes: Tensor, scores: Tensor, center0: Tensor, beta: float) -> Tensor:
    """CL-B selection score, paper eq. 7: ``s_j = score_j + beta * dis_j``.

    ``dis_j = max(0, 1 - |c_j - c0|^2 / (w_j^2 + h_j^2))`` with ``c0`` the centre of box j's
    cluster (eq. 6) and ``w_j, h_j`` box j's own size.

    Args:
        boxes: Tensor[K, 4] ``x1, y1, x2, y2``; scores: Tensor[K]; center0: Tensor[K, 2] (per box).
    Returns:
        Tensor[K].
    """
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    c = torch.stack([boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h], dim=1)
    diag2 = (w * w + h * h).clamp(min=torch.finfo(boxes.dtype).tiny)
    dis = (1.0 - ((c - center0) ** 2).sum(dim=1) / diag2).clamp(min=0.0)
    return scores + beta * dis


def clb_nms(
    boxes: Tensor, scores: Tensor, logits: Tensor, labels: Tensor, iou_threshold: float, beta: float = 1.0
) -> Tensor:
    """Classification-Localization balanced NMS, paper eq. 6-7.

    Clusters are those of class-wise greedy NMS (see :func:`nms_clusters`); in each cluster the
    member with the largest ``score + beta * dis`` is kept (the leader on ties). With ``beta=0``
    the result equals ``torchvision.ops.batched_nms`` exactly.

    Args:
        boxes: Tensor[K, 4], ``x1, y1, x2, y2`` in pixels.
        scores: Tensor[K], classification probabilities (what greedy NMS ranks by).
        logits: Tensor[K], the logits behind ``scores`` (eq. 6's softmax weights).
        labels: LongTensor[K], class of each box; clusters never mix classes.
        iou_threshold: boxes with IoU > this merge into a leader's cluster.
        beta: weight of the centre-distance term (>= 0).
    Returns:
        LongTensor[L]: indices of the kept boxes, one per cluster, sorted by ``scores`` descending.
    """
    if beta < 0:
        raise ValueError(f"beta={beta} must be >= 0")
    leaders, cluster = nms_clusters(boxes, scores, labels, iou_threshold)
    num_clusters = leaders.numel()
    if num_clusters == 0 or beta == 0:
        return leaders
    work = boxes.float()
    w = work[:, 2:] - work[:, :2]
    centers = work[:, :2] + 0.5 * w
    center0 = cluster_center(centers, logits.float(), cluster, num_clusters)
    s = clb_selection_score(work, scores.float(), center0[cluster], beta)

    best = torch.full((num_clusters,), float("-inf"), dtype=s.dtype, device=s.device)
    best.scatter_reduce_(0, cluster, s, reduce="amax")
    # Among the members reaching the cluster's best s prefer the leader, then the lowest index,
    # so the choice is deterministic.
    priority = torch.arange(1, cluster.numel() + 1, device=s.device)
    priority[leaders] = 0
    big = torch.iinfo(torch.int64).max
    cand = torch.where(s >= best[cluster], priority, torch.full_like(priority, big))
    chosen = torch.full((num_clusters,), big, dtype=torch.int64, device=s.device)
    chosen.scatter_reduce_(0, cluster, cand, reduce="amin")
    kept = torch.where(chosen == 0, leaders, chosen - 1)
    # Stable sort from the leaders' order: with beta=0 this is batched_nms's order exactly.
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
