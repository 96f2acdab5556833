"""Fidelity fixes from an outside review: GFL as mmdetection runs it, and the paper profile's guards.

One section per fix: GFL's NMS IoU (1), its frozen stages (2), batch padding in its loss (3), its
normalisers across ranks (4), per-detector anchor defaults (5), and ``model.weights_backbone``
required by ``detlab train`` / ``detlab sweep`` on the paper profile (7). Fix 6 (the anchor fit)
is tests/test_anchors_fit.py.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from detector.config import ModelConfig, flatten
from detector.gfl import GFLLoss, GFLTargets, atss_assign, level_points, valid_points
from detector.model import build_detector
from lab.settings.config import PROFILES, build_config, cell_key
from lab.plan.experiments import load_profile, split_table1_row, table_cells

GFL_ANCHORS = (64, 128, 256, 512, 1024)  # 8 x stride, P3..P7
RETINANET_ANCHORS = (32, 64, 128, 256, 512)  # 4 x stride


def _table1(profile: str, tmp_path: Path, weights: Path | None = None):
    """Table 1 cells of ``profile``; the paper profile gets its required data root and weights."""
    if profile != "paper":
        return table_cells(1, load_profile(profile))
    if weights is None:
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"x")
    return table_cells(1, load_profile("paper"), user={"model": {"weights_backbone": str(weights)}},
                       data_roots=[str(tmp_path)])


def _with_classes(cfg, **model):
    """``cfg`` with ``num_classes`` set (a cell takes it from its dataset) and other model keys replaced."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3, **model))


@pytest.fixture(scope="module")
def x101_weights(tmp_path_factory) -> Path:
    """A torchvision-format X-101-32x4d state_dict (random values): what the paper's GFL cells load."""
    from detector.backbones import resnext101_32x4d

    path = tmp_path_factory.mktemp("weights") / "x101.pth"
    torch.save(resnext101_32x4d().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def paper_gfl(x101_weights, tmp_path_factory):
    """The paper profile's GFL cells (gfl, gfl_dc, gfl_dc_clb) and the detector built from the first."""
    cells = _table1("paper", tmp_path_factory.mktemp("root"), x101_weights)
    cells = [c for c in cells if c.cfg.model.detector == "gfl"]
    return cells, build_detector(_with_classes(cells[0].cfg))


# ---------------------------------------------------------------------------------------------
# 1. GFL's NMS IoU is its test_cfg's 0.6 (mmdet), greedy and CL-B; RetinaNet keeps 0.5


def _two_overlapping_boxes():
    """Boxes [0,0,10,10] and [3,0,13,10] of one class: IoU 70 / 130 = 0.54, between 0.5 and 0.6."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 0.0, 13.0, 10.0]])
    scores = torch.tensor([0.9, 0.8])
    return boxes, scores, torch.logit(scores), torch.tensor([1, 1])


def _kept(model) -> int:
    counts = {"clusters": 0, "kept_not_top": 0}
    return int(model.postprocess.detections(*_two_overlapping_boxes(), 100, counts)["boxes"].shape[0])


@pytest.mark.medium
@pytest.mark.parametrize("profile", [p for p in PROFILES if p != "paper"])
def test_gfl_cells_post_process_at_iou_06_and_retinanet_cells_at_05(profile, tmp_path):
    cells = _table1(profile, tmp_path)
    gfl = [c for c in cells if c.cfg.model.detector == "gfl"]
    retina = [c for c in cells if c.cfg.model.detector == "retinanet"]
    assert {split_table1_row(c.row)[0] for c in gfl} == {"gfl", "gfl_dc", "gfl_dc_clb"} and retina
    for c in gfl:
        assert c.cfg.nms.iou_threshold == 0.6
        model = build_detector(_with_classes(c.cfg))
        assert model.postprocess.iou_threshold == 0.6 and model.postprocess.clb == c.cfg.nms.clb
        assert _kept(model) == 2  # IoU 0.54 < 0.6: two clusters, two boxes (greedy and CL-B alike)
    for c in retina:
        assert c.cfg.nms.iou_threshold == 0.5
    model = build_detector(_with_classes(retina[0].cfg))
    assert model.postprocess.iou_threshold == 0.5 and _kept(model) == 1


@pytest.mark.medium
def test_paper_gfl_cells_post_process_at_iou_06(paper_gfl, tmp_path):
    cells, model = paper_gfl
    assert [c.cfg.nms.iou_threshold for c in cells] == [0.6, 0.6, 0.6] and cells[-1].cfg.nms.clb
    assert model.postprocess.iou_threshold == 0.6 and _kept(model) == 2
    model.configure_nms(cells[-1].cfg.nms)  # the CL-B cell evaluates gfl_dc's weights with its own nms
    assert model.postprocess.clb and model.postprocess.iou_threshold == 0.6 and _kept(model) == 2
    retina = [c for c in _table1("paper", tmp_path) if c.cfg.model.detector == "retinanet"]
    assert retina and all(c.cfg.nms.iou_threshold == 0.5 for c in retina)


# ---------------------------------------------------------------------------------------------
# 2. mmdet's frozen_stages=1 (stem and res2 frozen) is torchvision's trainable_backbone_layers=3


@pytest.mark.medium
def test_paper_gfl_freezes_the_stem_and_c2_and_trains_c3_to_c5(paper_gfl):
    cells, model = paper_gfl
    m = cells[0].cfg.model
    assert m.trainable_backbone_layers == 3 and m.norm == "frozen_bn" and m.backbone == "resnext101_32x4d"
    body = model.backbone.body
    trains = {name: any(p.requires_grad for p in getattr(body, name).parameters())
              for name in ("conv1", "layer1", "layer2", "layer3", "layer4")}
    assert trains == {"conv1": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}
    assert all(p.requires_grad for p in body.layer4.parameters())  # DCN offsets of c5 included


# ---------------------------------------------------------------------------------------------
# 3. Batch padding: per image, points beyond its own padded size are neither ATSS candidates nor
#    QFL samples (mmdet's valid_flags over pad_shape: the image's size rounded up to 32)

STRIDES = [8, 16, 32, 64, 128]


def _grid(height: int, width: int):
    """GFL's points over a ``height x width`` input (the feature sizes of a ResNet-FPN: ceil(side / stride))."""
    return level_points([(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES], STRIDES, list(GFL_ANCHORS))


def test_valid_points_follow_each_images_own_padded_size():
    """A 48x96 image beside a 96x96 one: its own padded size is 64x96, so the points with y >= 64
    are padding: 4 rows of 12 on P3, 2 of 6 on P4, 1 of 3 on P5, 1 of 2 on P6, none on P7 = 65."""
    anchors, _, _ = _grid(96, 96)
    valid = valid_points(anchors, [(48, 96), (96, 96)], 32)
    centres_y = (anchors[:, 1] + anchors[:, 3]) / 2
    assert int((~valid[0]).sum()) == 65 and torch.equal(~valid[0], centres_y >= 64)
    assert bool(valid[1].all())
    # between the image (48) and its own padding (64) points stay valid, as in mmdet
    assert bool(valid[0][(centres_y >= 48) & (centres_y < 64)].all())


def test_atss_in_a_padded_batch_assigns_as_for_the_image_alone():
    """The 48x96 image in a 96x96 batch and alone (its 64x96 grid): the same positives. Without the
    mask the batch's extra P4-P6 rows join the candidates and move the threshold (9 positives, not 8)."""
    batch, batch_counts = _grid(96, 96)[0], _grid(96, 96)[2]
    alone, _, alone_counts = _grid(64, 96)
    valid = valid_points(batch, [(48, 96), (96, 96)], 32)[0]
    assert torch.equal(batch[valid], alone)  # same points, same order
    gt = torch.tensor([[32.0, 7.0, 87.0, 40.0]])
    masked = atss_assign(batch, batch_counts, gt, 9, valid)
    mine = atss_assign(alone, alone_counts, gt, 9)
    assert torch.equal(masked[valid], mine) and int((mine >= 0).sum()) == 8
    assert bool((masked[~valid] == -1).all())  # no padded point is positive
    unmasked = atss_assign(batch, batch_counts, gt, 9)
    assert int((unmasked >= 0).sum()) == 9 and not torch.equal(unmasked[valid], mine)


def _tiny_gfl():
    torch.manual_seed(0)
    model = build_detector(build_config({"model": {
        "detector": "gfl", "backbone": "resnet10", "backbone_width": 16, "fpn_channels": 32, "head_convs": 1,
        "num_classes": 3, "min_size": 96, "max_size": 96}}))
    return model.train()


def test_gfl_loss_ignores_the_logits_in_the_padding_of_the_smaller_image():
    """Images 48x96 and 96x96 (the transform keeps both sizes): the head's outputs at the 65 padded
    points of image 0 are changed through a forward hook; the loss does not move. The same change
    at valid points does."""
    model = _tiny_gfl()
    images = [torch.rand(3, 48, 96), torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[32.0, 7.0, 87.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([2])}]
    anchors, _, _ = _grid(96, 96)
    padded = torch.zeros(2, anchors.shape[0], dtype=torch.bool)
    padded[0] = (anchors[:, 1] + anchors[:, 3]) / 2 >= 64
    g = torch.Generator().manual_seed(1)

    def loss(where: torch.Tensor | None) -> dict[str, float]:
        handle = None
        if where is not None:
            def shift(module, inputs, out):
                cls, reg = out
                return (cls + 4.0 * where[..., None] * torch.randn(cls.shape, generator=g),
                        reg + 4.0 * where[..., None] * torch.randn(reg.shape, generator=g))
            handle = model.head.register_forward_hook(shift)
        try:
            return {k: float(v.detach()) for k, v in model([i.clone() for i in images],
                                                  [{k: v.clone() for k, v in t.items()} for t in targets]).items()}
        finally:
            if handle is not None:
                handle.remove()

    plain = loss(None)
    assert loss(padded) == pytest.approx(plain, rel=1e-6, abs=1e-9)
    inside = torch.zeros_like(padded)
    inside[0, torch.where(~padded[0])[0][:65]] = True
    assert loss(inside)["classification"] != pytest.approx(plain["classification"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# 4. The normalisers (positives, quality-weight sum) are averaged over the ranks (mmdet reduce_mean)


def _rank_batch(rank: int):
    """One image, 6 points, 3 classes; rank 0 has 3 positives, rank 1 one. The positives' logits are
    raised (+4) so the quality-weight sums (sum of max probabilities) exceed 1 on rank 0."""
    g = torch.Generator().manual_seed(10 + rank)
    anchors = torch.tensor([[0, 0, 16, 16], [8, 0, 24, 16], [16, 0, 32, 16], [0, 8, 16, 24], [8, 8, 24, 24],
                            [16, 8, 32, 24]], dtype=torch.float)
    pos = torch.tensor([1, 4, 2]) if rank == 0 else torch.tensor([4])
    gt = torch.tensor([[4.0, 2.0, 20.0, 14.0], [6.0, 6.0, 22.0, 26.0], [12.0, 0.0, 30.0, 12.0]])[:len(pos)]
    cls = torch.randn(1, 6, 3, generator=g)
    cls[0, pos] += 4.0
    reg = torch.randn(1, 6, 4 * 9, generator=g)
    t = GFLTargets(torch.zeros_like(pos), pos, gt, torch.arange(len(pos)) % 3)
    weight_sum = float(cls[0, pos].sigmoid().max(dim=1).values.sum())
    return (cls, reg, anchors, torch.full((6,), 8.0), t), weight_sum


def _losses(batch) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in GFLLoss(reg_max=8)(*batch).items()}


def _normaliser_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    batch, _ = _rank_batch(rank)
    local = _losses(batch)  # before the group exists: this rank's own normalisers
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        shared = _losses(batch)
    finally:
        dist.destroy_process_group()
    torch.save({"local": local, "shared": shared}, f"{out}/rank{rank}.pt")


@pytest.mark.medium
def test_gfl_normalisers_are_the_mean_over_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_normaliser_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    counts, weights = [3.0, 1.0], [_rank_batch(r)[1] for r in (0, 1)]
    mean_pos, mean_w = sum(counts) / 2, max(sum(weights) / 2, 1.0)
    assert weights[0] > 1.0 > weights[1] and mean_w > 1.0  # rank 1 alone would clamp its sum to 1
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        local, shared = res["local"], res["shared"]
        # local = sum / own normaliser; shared = sum / the mean of both ranks' normalisers
        assert shared["classification"] == pytest.approx(local["classification"] * counts[rank] / mean_pos, rel=1e-5)
        own_w = max(weights[rank], 1.0)
        for k in ("bbox_regression", "distribution"):
            assert shared[k] == pytest.approx(local[k] * own_w / mean_w, rel=1e-5)


def test_gfl_loss_is_unchanged_in_a_one_rank_group(tmp_path):
    batch, _ = _rank_batch(0)
    alone = _losses(batch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _losses(batch) == alone
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# 5. Anchor sizes left empty are the detector's default: GFL 8 x stride, RetinaNet 4 x stride


def test_empty_anchor_sizes_take_the_detectors_default():
    assert ModelConfig().anchor_sizes == RETINANET_ANCHORS
    assert ModelConfig(detector="gfl").anchor_sizes == GFL_ANCHORS
    defaults = {"gfl": GFL_ANCHORS, "retinanet": RETINANET_ANCHORS, "faster_rcnn": RETINANET_ANCHORS}
    for detector, default in defaults.items():
        assert build_config({"model": {"detector": detector}}).model.anchor_sizes == default
        assert build_config({"model": {"detector": detector, "anchor_sizes": []}}).model.anchor_sizes == default
    mine = (16, 32, 64, 128, 256)
    assert build_config({"model": {"detector": "gfl", "anchor_sizes": list(mine)}}).model.anchor_sizes == mine
    # RetinaNet's resolved default is what it hashed before: its cell keys do not change
    unset = build_config({})
    assert flatten(unset)["model.anchor_sizes"] == list(RETINANET_ANCHORS)
    assert cell_key(unset) == cell_key(build_config({"model": {"anchor_sizes": list(RETINANET_ANCHORS)}}))


def test_profiles_keep_their_anchor_sizes_and_gfl_without_one_gets_8x_stride(tmp_path):
    by_profile = {p: {c.cfg.model.detector: c.cfg.model.anchor_sizes for c in _table1(p, tmp_path)}
                  for p in PROFILES}
    assert by_profile["smoke"]["gfl"] == GFL_ANCHORS  # no anchors in the profile: GFL's default
    assert by_profile["smoke"]["retinanet"] == RETINANET_ANCHORS
    for p in ("demo", "cpu"):  # the profile's own sizes
        assert by_profile[p]["gfl"] == (32, 64, 128, 256, 512) and by_profile[p]["retinanet"] == (16, 32, 64, 128, 256)
    assert by_profile["paper"]["gfl"] == GFL_ANCHORS and by_profile["paper"]["retinanet"] == RETINANET_ANCHORS
    assert _tiny_gfl().anchor_sizes == GFL_ANCHORS  # the built detector lays them


# ---------------------------------------------------------------------------------------------
# 7. detlab train / sweep on the paper profile refuse random weights under frozen BN, before Ray


@pytest.mark.medium
@pytest.mark.parametrize("command", [["train", "--set", "data.root={root}"], ["sweep", "--data-root", "{root}"]])
def test_paper_train_and_sweep_refuse_an_unset_weights_backbone(command, tmp_path, capsys):
    import ray

    from lab.cli import main

    argv = [a.format(root=tmp_path) for a in command] + ["--profile", "paper", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.weights_backbone must be set" in err and "--set model.weights_backbone=PATH" in err, err
    assert not ray.is_initialized()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert main([*argv, "--set", f"model.weights_backbone={weights}", "--dry-run"]) == 0  # given: accepted
    assert not ray.is_initialized()


@pytest.mark.medium
def test_detlab_data_on_the_paper_profile_needs_no_weights(tmp_path, capsys):
    from lab.cli import main

    assert main(["data", "coco", "--profile", "paper", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "annotation file" in err and "weights_backbone" not in err, err  # the data check, not the weights
