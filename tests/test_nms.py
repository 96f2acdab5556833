"""CL-B NMS, eq. 6-7: a loop-based reference, hand-made clusters, and parity with batched_nms."""

import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from detector.nms import class_wise_nms, clb_nms, cluster_center, greedy_nms, nms_clusters


def _clustered(n: int, seed: int, num_classes: int = 80, objects: int = 40, tie_scores: bool = False):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(objects, 2, generator=g) * 600
    sizes = torch.rand(objects, 2, generator=g) * 120 + 10
    obj_cls = torch.randint(0, num_classes, (objects,), generator=g)
    o = torch.randint(0, objects, (n,), generator=g)
    c = centres[o] + torch.randn(n, 2, generator=g) * 6
    s = sizes[o] * (1 + 0.1 * torch.randn(n, 2, generator=g)).abs()
    boxes = torch.cat([c - s / 2, c + s / 2], 1)
    logits = torch.randn(n, generator=g) * 2
    if tie_scores:
        logits = (logits * 2).round() / 2
    labels = torch.where(torch.rand(n, generator=g) < 0.8, obj_cls[o], torch.randint(0, num_classes, (n,), generator=g))
    return boxes, logits.sigmoid(), logits, labels


def _reference_clb(boxes, scores, logits, labels, thr, beta):
    """Eq. 6-7 written with plain Python loops over clusters and members."""
    leaders = batched_nms(boxes, scores, labels, thr).tolist()
    iou = box_iou(boxes, boxes)
    members = {l: [l] for l in leaders}
    for j in range(boxes.shape[0]):
        if j in members:
            continue
        for l in leaders:
            if labels[l] == labels[j] and iou[j, l] > thr:
                members[l].append(j)
                break
    kept = []
    for l in leaders:
        m = members[l]
        w = torch.softmax(logits[m].double(), 0)
        ctr = torch.stack([(boxes[m, 0] + boxes[m, 2]) / 2, (boxes[m, 1] + boxes[m, 3]) / 2], 1).double()
        c0 = (w[:, None] * ctr).sum(0)
        best, best_s = l, None
        for k, j in enumerate(m):
            bw, bh = float(boxes[j, 2] - boxes[j, 0]), float(boxes[j, 3] - boxes[j, 1])
            dis = max(0.0, 1.0 - float(((ctr[k] - c0) ** 2).sum()) / (bw * bw + bh * bh))
            s = float(scores[j]) + beta * dis
            if best_s is None or s > best_s + 1e-6:
                best, best_s = j, s
        kept.append(best)
    kept.sort(key=lambda j: -float(scores[j]))
    return kept, members


@pytest.mark.medium
@pytest.mark.parametrize("n", [0, 1, 999, 1000, 1001, 5000])  # either side of batched_nms's CPU cut-over (1000)
def test_class_wise_nms_equals_batched_nms_bit_for_bit(n):
    """Same indices in the same order: tied scores, one class, 200 classes, labels with gaps and
    negative values, float64, a threshold of 0 and of 1."""
    for seed in range(4):
        boxes, scores, _, labels = _clustered(n, seed, num_classes=(80, 1, 200, 80)[seed], tie_scores=seed % 2 == 0)
        if seed == 3:
            labels, boxes, scores = labels * 7 - 100, boxes.double(), scores.double()
        for thr in (0.0, 0.5, 0.7, 1.0):
            assert torch.equal(class_wise_nms(boxes, scores, labels, thr), batched_nms(boxes, scores, labels, thr))


@pytest.mark.parametrize("n", [0, 1, 7, 300, 1500, 5000])
def test_beta_zero_equals_batched_nms(n):
    for seed in range(3):
        boxes, scores, logits, labels = _clustered(n, seed, tie_scores=seed == 2)
        expected = batched_nms(boxes, scores, labels, 0.5)
        for mode in ("own", "cluster_max"):
            out = clb_nms(boxes, scores, logits, labels, 0.5, beta=0.0, score_mode=mode)
            assert torch.equal(out.keep, expected)
            assert torch.equal(out.scores, scores[expected]) and not out.not_top.any()
        # beta > 0 never changes how many boxes survive: one per cluster
        assert clb_nms(boxes, scores, logits, labels, 0.5, beta=2.0).keep.numel() == expected.numel()


@pytest.mark.medium
@pytest.mark.parametrize("num_classes, objects", [(5, 12), (80, 40)])  # few leaders per class, and many classes
def test_matches_loop_reference(num_classes, objects):
    for seed in range(4):
        boxes, scores, logits, labels = _clustered(400, seed, num_classes=num_classes, objects=objects)
        for beta in (0.5, 1.0, 3.0):
            ref, members = _reference_clb(boxes, scores, logits, labels, 0.5, beta)
            got = clb_nms(boxes, scores, logits, labels, 0.5, beta).keep
            assert set(got.tolist()) == set(ref), (seed, beta)
            assert got.numel() == len(members)
        leaders, cluster = nms_clusters(boxes, scores, labels, 0.5)
        for pos, l in enumerate(leaders.tolist()):
            assert sorted(torch.where(cluster == pos)[0].tolist()) == sorted(members[l])


def test_hand_made_cluster_prefers_centred_box():
    # One object centred at x=50, boxes 40x40. The top-scored box (.6) is shifted 12 px right; four
    # identical boxes (.55) sit on the centre. A far-away box forms its own cluster.
    boxes = torch.tensor([[42.0, 30.0, 82.0, 70.0]] + [[30.0, 30.0, 70.0, 70.0]] * 4 + [[200.0, 200.0, 240.0, 240.0]])
    scores = torch.tensor([0.6, 0.55, 0.55, 0.55, 0.55, 0.5])
    logits = torch.logit(scores)
    labels = torch.zeros(6, dtype=torch.int64)
    # eq. 6 by hand: softmax(logit(p)) is proportional to the odds p/(1-p): 1.5 and 4 x 11/9.
    c0x = (1.5 * 62 + 4 * (11 / 9) * 50) / (1.5 + 4 * 11 / 9)  # = 52.817
    assert c0x == pytest.approx(52.817, abs=1e-3)
    centers = torch.tensor([[62.0, 50.0]] + [[50.0, 50.0]] * 4 + [[220.0, 220.0]])
    cluster = torch.tensor([0, 0, 0, 0, 0, 1])
    torch.testing.assert_close(cluster_center(centers, logits, cluster, 2), torch.tensor([[c0x, 50.0], [220.0, 220.0]]))
    # eq. 7: dis = 1 - d^2 / (40^2 + 40^2): box 0: 1 - 9.183^2/3200 = 0.97365; boxes 1-4: 1 - 2.817^2/3200 = 0.99752
    dis0 = 1 - (62 - c0x) ** 2 / 3200
    dis1 = 1 - (50 - c0x) ** 2 / 3200
    assert (dis0, dis1) == (pytest.approx(0.97365, abs=1e-5), pytest.approx(0.99752, abs=1e-5))
    # beta = 1: s0 = 0.6 + 0.97365 = 1.5737 > s1 = 0.55 + 0.99752 = 1.5475 -> the leader stays
    assert clb_nms(boxes, scores, logits, labels, 0.5, beta=1.0).keep.tolist() == [0, 5]
    # beta = 3: s0 = 3.5210 < s1 = 3.5426 -> a centred box (the first of the tied four) replaces it
    out = clb_nms(boxes, scores, logits, labels, 0.5, beta=3.0)
    assert out.keep.tolist() == [1, 5] and out.not_top.tolist() == [True, False]
    torch.testing.assert_close(out.scores, torch.tensor([0.55, 0.5]))  # "own": the kept box's p
    top = clb_nms(boxes, scores, logits, labels, 0.5, beta=3.0, score_mode="cluster_max")
    assert top.keep.tolist() == [1, 5] and top.not_top.tolist() == [True, False]
    torch.testing.assert_close(top.scores, torch.tensor([0.6, 0.5]))  # the cluster's top p (box 0's)
    assert clb_nms(boxes, scores, logits, labels, 0.5, beta=0.0).keep.tolist() == [0, 5]


def test_clusters_never_mix_classes_and_output_sorted():
    boxes, scores, logits, labels = _clustered(2000, 7, num_classes=3, objects=10)
    leaders, cluster = nms_clusters(boxes, scores, labels, 0.5)
    assert torch.equal(labels, labels[leaders][cluster])
    out = clb_nms(boxes, scores, logits, labels, 0.5, beta=1.0)
    assert torch.equal(out.scores, scores[out.keep])
    assert bool((out.scores[:-1] >= out.scores[1:]).all())


def test_degenerate_boxes_and_negative_beta():
    boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.zeros(3, dtype=torch.int64)
    out = clb_nms(boxes, scores, torch.logit(scores), labels, 0.5, beta=1.0)
    assert torch.equal(out.keep, batched_nms(boxes, scores, labels, 0.5))
    with pytest.raises(ValueError, match="beta"):
        clb_nms(boxes, scores, scores, labels, 0.5, beta=-1.0)
    with pytest.raises(ValueError, match="nms.clb_score"):
        clb_nms(boxes, scores, scores, labels, 0.5, score_mode="mean")


def _members(cluster: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """For each kept box, the indices of its cluster's members (a box is in exactly one cluster)."""
    return [torch.where(cluster == cluster[j])[0].tolist() for j in kept.tolist()]


@pytest.mark.parametrize("beta", [0.5, 2.0, 4.0])
def test_cluster_max_reports_the_top_score_of_each_cluster(beta):
    for seed in range(3):
        boxes, scores, logits, labels = _clustered(1500, seed, num_classes=5, objects=20)
        _, cluster = nms_clusters(boxes, scores, labels, 0.5)
        own = clb_nms(boxes, scores, logits, labels, 0.5, beta)
        top = clb_nms(boxes, scores, logits, labels, 0.5, beta, score_mode="cluster_max")
        assert set(top.keep.tolist()) == set(own.keep.tolist())  # the mode changes scores, not the choice
        assert torch.equal(own.scores, scores[own.keep])  # "own" reports each kept box's own p
        for j, s, members in zip(top.keep.tolist(), top.scores.tolist(), _members(cluster, top.keep)):
            assert s == float(scores[members].max())
        assert bool((top.scores[:-1] >= top.scores[1:]).all())
        # not_top: the kept box's own p is below its cluster's top; and CL-B with beta > 0 does move some
        for j, flag, members in zip(own.keep.tolist(), own.not_top.tolist(), _members(cluster, own.keep)):
            assert flag == bool(scores[j] < scores[members].max())
        if seed > 0 or beta > 1:  # measured: every such case moves at least one cluster off its top box
            assert own.not_top.any()


def test_greedy_nms_result():
    boxes, scores, logits, labels = _clustered(300, 1)
    out = greedy_nms(boxes, scores, labels, 0.5)
    assert torch.equal(out.keep, batched_nms(boxes, scores, labels, 0.5))
    assert torch.equal(out.scores, scores[out.keep]) and not out.not_top.any()
    assert torch.equal(out[:3].keep, out.keep[:3]) and out[:3].scores.numel() == 3
