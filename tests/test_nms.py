"""CL-B NMS, eq. 6-7: a loop-based reference, hand-made clusters, and parity with batched_nms."""

import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from detector.nms import clb_nms, cluster_center, nms_clusters


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


@pytest.mark.parametrize("n", [0, 1, 7, 300, 1500, 5000])
def test_beta_zero_equals_batched_nms(n):
    for seed in range(3):
        boxes, scores, logits, labels = _clustered(n, seed, tie_scores=seed == 2)
        expected = batched_nms(boxes, scores, labels, 0.5)
        assert torch.equal(clb_nms(boxes, scores, logits, labels, 0.5, beta=0.0), expected)
        # beta > 0 never changes how many boxes survive: one per cluster
        assert clb_nms(boxes, scores, logits, labels, 0.5, beta=2.0).numel() == expected.numel()


def test_matches_loop_reference():
    for seed in range(4):
        boxes, scores, logits, labels = _clustered(400, seed, num_classes=5, objects=12)
        for beta in (0.5, 1.0, 3.0):
            ref, members = _reference_clb(boxes, scores, logits, labels, 0.5, beta)
            got = clb_nms(boxes, scores, logits, labels, 0.5, beta)
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
    assert clb_nms(boxes, scores, logits, labels, 0.5, beta=1.0).tolist() == [0, 5]
    # beta = 3: s0 = 3.5210 < s1 = 3.5426 -> a centred box (the first of the tied four) replaces it
    assert clb_nms(boxes, scores, logits, labels, 0.5, beta=3.0).tolist() == [1, 5]
    assert clb_nms(boxes, scores, logits, labels, 0.5, beta=0.0).tolist() == [0, 5]


def test_clusters_never_mix_classes_and_output_sorted():
    boxes, scores, logits, labels = _clustered(2000, 7, num_classes=3, objects=10)
    leaders, cluster = nms_clusters(boxes, scores, labels, 0.5)
    assert torch.equal(labels, labels[leaders][cluster])
    kept = clb_nms(boxes, scores, logits, labels, 0.5, beta=1.0)
    assert bool((scores[kept][:-1] >= scores[kept][1:]).all())


def test_degenerate_boxes_and_negative_beta():
    boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.zeros(3, dtype=torch.int64)
    out = clb_nms(boxes, scores, torch.logit(scores), labels, 0.5, beta=1.0)
    assert torch.equal(out, batched_nms(boxes, scores, labels, 0.5))
    with pytest.raises(ValueError, match="beta"):
        clb_nms(boxes, scores, scores, labels, 0.5, beta=-1.0)
