"""Classification-Localization balanced NMS (CL-B NMS, paper eq. 6-7).

Readings of the paper that it leaves open (ours; config keys in ``NmsConfig``):

* A cluster is what class-wise greedy NMS merges: the leaders are
  ``batched_nms(boxes, scores, labels, iou_threshold)`` and every box belongs to the first leader
  (in that order) of its own class with ``IoU > iou_threshold`` (a leader to itself).
* eq. 6's weights are the softmax of the members' *logits* for their class.
* eq. 7's ``dis`` must fall with distance (a raw distance would reward outliers), so it is the
  bounded similarity ``dis_j = max(0, 1 - |c_j - c0|^2 / (w_j^2 + h_j^2))`` normalised by box j's
  own diagonal, and weighted: ``s_j = score_j + beta * dis_j``.
* One box per cluster is kept: the member with the largest ``s`` (the leader on ties).
* The score a kept box reports (what COCO AP ranks by) is ``nms.clb_score``: ``"own"`` (default)
  keeps its own ``score_j`` (``s`` is a selection criterion only); ``"cluster_max"`` gives it the
  highest score of its cluster, as IoU-Net's IoU-guided NMS does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detector.config import NmsConfig


def class_wise_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each class: ``torchvision.ops.batched_nms``'s result, bit for bit (tested).

    Above torchvision's own cut-over (1000 boxes on CPU, 5000 on CUDA) ``batched_nms`` runs one
    ``nms`` per class, each on a mask-selected copy (a compare and a gather over all K boxes per
    class). Here the boxes are sorted by class once (stable, so each class keeps its boxes in input
    order, as ``batched_nms`` hands them to ``nms``) and each class's ``nms`` runs on a slice. Below
    the cut-over this *is* ``batched_nms`` (its coordinate-offset path).

    Args:
        boxes: Tensor[K, 4] ``x1, y1, x2, y2``; scores: Tensor[K]; labels: LongTensor[K].
    Returns:
        LongTensor[L]: indices of the kept boxes, by score descending (``batched_nms``'s order).
    """
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 20000):
        return batched_nms(boxes, scores, labels, iou_threshold)
    order = torch.sort(labels, stable=True).indices
    counts = torch.unique_consecutive(labels[order], return_counts=True)[1].tolist()
    sorted_boxes, sorted_scores = boxes[order], scores[order]
    nms = torch.ops.torchvision.nms
    kept, start = [], 0
    for count in counts:
        kept.append(nms(sorted_boxes[start:start + count], sorted_scores[start:start + count], iou_threshold) + start)
        start += count
    keep_mask = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep_mask[order[torch.cat(kept)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]  # batched_nms's final sort, on the same input


def nms_clusters(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """Leaders of class-wise greedy NMS and the cluster of every box.

    Args:
        boxes: Tensor[K, 4] ``x1, y1, x2, y2``; scores: Tensor[K]; labels: LongTensor[K].
    Returns:
        leaders: LongTensor[L], indices of the kept boxes in ``batched_nms`` order (score desc).
        cluster: LongTensor[K], for each box the position in ``leaders`` of its cluster's leader.
    """
    num = boxes.shape[0]
    leaders = class_wise_nms(boxes, scores, labels, iou_threshold)
    cluster = torch.empty(num, dtype=torch.int64, device=boxes.device)
    if num == 0:
        return leaders, cluster

    # A leader is its own cluster; only suppressed boxes need a search, and only among the leaders
    # of their own class. Lay those out as a table [classes, W] (W = most leaders in one class,
    # each class's leaders in NMS order) and test every suppressed box against its class's row at
    # once: a few dense ops on [M, W] instead of a Python loop or a gather per (box, leader) pair.
    n_lead = leaders.numel()
    cluster[leaders] = torch.arange(n_lead, device=boxes.device)
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
    n_cls = int(label_ids.max()) + 1
    order = torch.sort(leader_cls, stable=True).indices  # positions in `leaders`, grouped by class
    per_cls = torch.bincount(leader_cls, minlength=n_cls)
    width = int(per_cls.max())
    sorted_cls = leader_cls[order]
    rank = torch.arange(n_lead, device=boxes.device) - (torch.cumsum(per_cls, 0) - per_cls)[sorted_cls]
    table = torch.full((n_cls, width), -1, dtype=torch.int64, device=boxes.device)
    table[sorted_cls, rank] = order
    # coordinates and areas as columns [5, ...]: each coordinate of [M, W] is then contiguous
    cols = torch.cat([boxes.t(), ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None]])
    lead_cols = torch.zeros(5, n_cls, width, dtype=boxes.dtype, device=boxes.device)
    lead_cols[:, sorted_cls, rank] = cols[:, leaders[order]]
    member_cls = label_ids[members]
    cand = table.index_select(0, member_cls)  # [M, W] leader positions, -1 = none
    lb = lead_cols.index_select(1, member_cls)  # [5, M, W]; a missing leader is an all-zero box
    mb = cols.index_select(1, members).unsqueeze(2)  # [5, M, 1]
    iw = (torch.min(mb[2], lb[2]) - torch.max(mb[0], lb[0])).clamp_(min=0)
    ih = (torch.min(mb[3], lb[3]) - torch.max(mb[1], lb[1])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (mb[4] + lb[4]).sub_(inter)
    # First leader (lowest position: a row is in NMS order) with IoU > threshold, tested as
    # inter > t * union (no division; the zero boxes of missing leaders never pass); argmax of a
    # 0/1 row is its first 1.
    hit = inter > iou_threshold * union
    found = hit.any(dim=1)
    first = cand.gather(1, hit.to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1)
    # The kernel in batched_nms computes IoU in its own float order; a box it suppressed at exactly
    # the threshold may miss every leader here. Give such boxes their highest-IoU leader.
    if not bool(found.all()):
        iou = torch.where((union > 0) & (cand >= 0), inter / union.clamp(min=torch.finfo(inter.dtype).tiny),
                          torch.full_like(inter, -1.0))
        first = torch.where(found, first, cand.gather(1, iou.argmax(dim=1, keepdim=True)).squeeze(1))
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


#: ``score_mode`` values of :func:`clb_nms` (the config key ``nms.clb_score``).
SCORE_MODES = ("own", "cluster_max")


@dataclass(frozen=True)
class NmsResult:
    """What NMS keeps: one box per cluster, in the order of the reported scores (descending).

    Attributes:
        keep: LongTensor[L], indices into the candidates.
        scores: Tensor[L], the score each kept box reports (see ``score_mode`` of :func:`clb_nms`).
        not_top: BoolTensor[L], True where the kept box's own score is strictly below the highest
            score of its cluster (CL-B chose a better-centred, lower-scored member; ties with the
            top count as top). Always False for greedy NMS, which keeps each cluster's top box.
    """

    keep: Tensor
    scores: Tensor
    not_top: Tensor

    def __getitem__(self, index: slice) -> "NmsResult":
        """The first kept boxes (``result[:100]``): the same slice of every field."""
        return NmsResult(self.keep[index], self.scores[index], self.not_top[index])


def greedy_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> NmsResult:
    """Class-wise greedy NMS (:func:`class_wise_nms`, ``batched_nms``'s result) as an :class:`NmsResult`
    (own scores, ``not_top`` all False)."""
    keep = class_wise_nms(boxes, scores, labels, iou_threshold)
    return NmsResult(keep, scores[keep], torch.zeros(keep.shape, dtype=torch.bool, device=keep.device))


def clb_nms(
    boxes: Tensor,
    scores: Tensor,
    logits: Tensor,
    labels: Tensor,
    iou_threshold: float,
    beta: float = 1.0,
    score_mode: str = "own",
) -> NmsResult:
    """Classification-Localization balanced NMS, paper eq. 6-7.

    Clusters are those of class-wise greedy NMS (see :func:`nms_clusters`); in each cluster the
    member with the largest ``score + beta * dis`` is kept (the leader on ties). With ``beta=0``
    the kept indices and their order equal ``torchvision.ops.batched_nms`` exactly (either mode).

    The score a kept box reports is an open reading (config key ``nms.clb_score``):

    * ``"own"`` (default): its own ``scores[j]``; eq. 7's ``s`` selects, it is not reported.
    * ``"cluster_max"``: the highest ``scores`` over its cluster's members (IoU-Net's IoU-guided
      NMS): the cluster keeps its confidence and gains the better-centred box.

    Args:
        boxes: Tensor[K, 4], ``x1, y1, x2, y2`` in pixels.
        scores: Tensor[K], classification probabilities (what greedy NMS ranks by).
        logits: Tensor[K], the logits behind ``scores`` (eq. 6's softmax weights).
        labels: LongTensor[K], class of each box; clusters never mix classes.
        iou_threshold: boxes with IoU > this merge into a leader's cluster.
        beta: weight of the centre-distance term (>= 0).
        score_mode: ``"own"`` or ``"cluster_max"``.
    Returns:
        :class:`NmsResult`: ``keep`` (LongTensor[L], one per cluster), the reported ``scores``
        [L] and ``not_top`` [L], sorted by the reported scores descending (stable).
    """
    if beta < 0:
        raise ValueError(f"beta={beta} must be >= 0")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode={score_mode!r} is not one of {SCORE_MODES} (config key nms.clb_score)")
    leaders, cluster = nms_clusters(boxes, scores, labels, iou_threshold)
    num_clusters = leaders.numel()
    if num_clusters == 0 or beta == 0:
        kept = leaders
    else:
        kept = _clb_select(boxes, scores, logits, leaders, cluster, beta)
    # kept[k] is cluster k's choice; its cluster's top score and whether the choice falls short of it
    top = torch.full((num_clusters,), float("-inf"), dtype=scores.dtype, device=scores.device)
    top.scatter_reduce_(0, cluster, scores, reduce="amax")
    own = scores[kept]
    reported = top if score_mode == "cluster_max" else own
    # Stable sort from the leaders' order: with beta=0 this is batched_nms's order exactly.
    order = torch.sort(reported, descending=True, stable=True).indices
    return NmsResult(kept[order], reported[order], (own < top)[order])


def _clb_select(boxes: Tensor, scores: Tensor, logits: Tensor, leaders: Tensor, cluster: Tensor, beta: float) -> Tensor:
    """Per cluster, in ``leaders`` order, the member with the largest eq. 7 ``s`` (leader on ties)."""
    num_clusters = leaders.numel()
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
    return torch.where(chosen == 0, leaders, chosen - 1)


# ------------------------------------------------------------------------------------------------
# Post-processing NMS: (boxes[K,4], scores[K], logits[K], labels[K]) -> NmsResult (kept, reported
# scores, kept-not-top flags), in reported-score order


@dataclass
class NmsPostprocess:
    """Greedy class-wise NMS, or CL-B NMS (eq. 6-7) when ``clb`` (``score``: ``nms.clb_score``)."""

    clb: bool = False
    iou_threshold: float = 0.5
    beta: float = 1.0
    score: str = "own"

    def __call__(self, boxes: Tensor, scores: Tensor, logits: Tensor, labels: Tensor) -> NmsResult:
        if self.clb:
            return clb_nms(boxes, scores, logits, labels, self.iou_threshold, self.beta, self.score)
        return greedy_nms(boxes, scores, labels, self.iou_threshold)

    def detections(self, boxes: Tensor, scores: Tensor, logits: Tensor, labels: Tensor, limit: int,
                   counts: dict[str, int]) -> dict[str, Tensor]:
        """One image's detections from its candidates: this NMS, the first ``limit`` kept, and
        ``counts`` (a detector's ``nms_stats``) updated with ``clusters`` and ``kept_not_top``.

        Returns ``{"boxes" [N, 4], "scores" [N] (as reported), "labels" [N]}``, N <= limit.
        """
        result = self(boxes, scores, logits, labels)[:limit]
        counts["clusters"] += int(result.keep.numel())
        counts["kept_not_top"] += int(result.not_top.sum())
        return {"boxes": boxes[result.keep], "scores": result.scores, "labels": labels[result.keep]}


def build_postprocess(cfg: NmsConfig) -> NmsPostprocess:
    return NmsPostprocess(cfg.clb, cfg.iou_threshold, cfg.beta, cfg.clb_score)


def top_candidates(logits: Tensor, score_thresh: float, topk: int) -> tuple[Tensor, Tensor]:
    """Candidates of one level before NMS, as torchvision's RetinaNet selects them.

    Args:
        logits: Tensor[A, C], the level's classification logits.
    Returns:
        scores Tensor[K] (sigmoid, descending) and their flat indices LongTensor[K] into
        ``logits.flatten()`` (anchor ``i // C``, class ``i % C``): those above ``score_thresh``,
        at most ``topk``.
    """
    scores = torch.sigmoid(logits.flatten())
    keep = torch.where(scores > score_thresh)[0]
    scores, idx = scores[keep].topk(min(topk, keep.numel()))
    return scores, keep[idx]
