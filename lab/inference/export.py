"""``detlab export WEIGHTS``: a trained model.pt to ONNX and/or TorchScript, with a manifest.

Writes into ``--out``: ``model.onnx`` and/or ``model.torchscript.pt`` (the dense graph of
:mod:`detector.export`: normalisation, backbone, FPN, head, decoded boxes; no NMS) and
``export.json`` (input and output names and shapes, image size, class names, mean/std, the
inference settings and NMS that :func:`detector.export.postprocess` applies out of the graph, the
weights' sha256, the opset). ``--check`` runs the exported files against PyTorch and returns 1
when their outputs or final detections disagree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.config import ConfigError, parse_override
from detector.export import (DEFAULT_OPSET, INPUT_NAME, SCORE_FORMULA, ExportableDetector, ExportLayout,
                             default_image_size, detections_mismatch, export_layout, export_onnx, export_torchscript,
                             postprocess)

FORMATS = ("onnx", "torchscript", "both")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
MANIFEST = "export.json"
#: what ``--set`` may change: inference only (the graph's weights and shapes come from WEIGHTS)
SETTABLE = ("nms.", "model.score_thresh", "model.topk_candidates", "model.detections_per_img")
#: ``--check`` tolerances. Raw outputs: max |exported - PyTorch| <= RTOL x max(1, max |PyTorch|)
#: (float32 kernels differ in summation order: ~1e-6 relative is typical). Final detections: same
#: count and labels, boxes within BOX_ATOL px, scores within SCORE_ATOL.
RTOL, BOX_ATOL, SCORE_ATOL = 1e-4, 1e-2, 1e-4


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lab.records.models import SOURCE_HELP

    p.add_argument("weights", metavar="WEIGHTS", help=SOURCE_HELP)
    p.add_argument("--tracking-uri", default=None,
                   help="the MLflow store a run id/name or models:/ URI is looked up in (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite under ./mlruns)")
    p.add_argument("--format", choices=FORMATS, default="both", help="what to write (default: both)")
    p.add_argument("--out", type=Path, default=Path("export"), help="output dir (default: export/)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="the graph's fixed input size; one the model's resize leaves unchanged "
                   "(default: min_size x min_size)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--set", action="append", default=[], metavar="nms.KEY=VALUE", dest="sets",
                   help="inference settings recorded for the post-processing, e.g. --set nms.clb=true "
                   "--set model.score_thresh=0.1 (" + ", ".join(SETTABLE) + ")")
    p.add_argument("--check", action="store_true",
                   help="run the exported files against PyTorch; exit 1 when they disagree")
    p.add_argument("--check-image", type=Path, default=None, metavar="IMAGE",
                   help="the image --check runs on, resized to --size (default: a random one)")


def main(argv: list[str]) -> int:
    """``detlab export ARGS``: its own parser, so that the other commands start without torch."""
    parser = argparse.ArgumentParser(prog="detlab export", description="trained weights to ONNX and/or TorchScript "
                                     "(the dense graph; NMS outside, recorded in the manifest)")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _load_payload(source: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The weights WEIGHTS names (:func:`lab.records.models.load_source`: a path, a run, a models:/ URI):
    ``{"model": state_dict, "config": dict, "class_names": list, "sha256": hex of the file}``."""
    from lab.records.models import load_source

    return load_source(source, tracking_uri)[1]


def build_model(payload: dict[str, Any], sets: list[str]) -> tuple[nn.Module, Any]:
    """The eval-mode detector of a weights payload, with ``sets`` (inference keys only) applied
    and its NMS configured; returns it and its config (a :class:`lab.settings.config.LabConfig`)."""
    from lab.records.models import rebuild

    for item in sets:
        key = parse_override(item)[0]
        if not key.startswith(SETTABLE[0]) and key not in SETTABLE[1:]:
            raise ConfigError(f"--set {item!r}: only inference settings can change on trained weights "
                              f"({', '.join(SETTABLE)})")
    built = rebuild(payload, sets)
    return built.model, built.cfg


def run(args: argparse.Namespace) -> int:
    """``detlab export``; 0 when written (and, with ``--check``, agreeing), 1 when the check fails.

    Raises ``ConfigError`` naming the value for a bad WEIGHTS, ``--format``, ``--size`` or ``--set``.
    """
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r}: not one of {', '.join(FORMATS)}")
    source = str(args.weights)
    payload = _load_payload(source, args.tracking_uri)
    model, cfg = build_model(payload, list(args.sets))
    size = tuple(args.size) if args.size else default_image_size(model)
    try:
        layout = export_layout(model, size)
    except ValueError as e:  # a size the transform would resize, or a detector that cannot be exported
        raise ConfigError(f"WEIGHTS {source!r} (model.detector={cfg.model.detector!r}), --size {size[0]} {size[1]}: "
                          f"{e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    formats = ("onnx", "torchscript") if args.format == "both" else (args.format,)
    written: dict[str, Path] = {}
    for fmt in formats:
        path = out / FILES[fmt]
        if fmt == "onnx":
            export_onnx(model, path, size, opset=args.opset)
        else:
            export_torchscript(model, path, size)
        written[fmt] = path
    manifest = _manifest(model, cfg, payload, source, layout, written, args.opset)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for path in (*written.values(), out / MANIFEST):
        print(f"wrote {path}")
    if not args.check:
        return 0
    return 0 if _check(model, layout, written, args.check_image) else 1


def _manifest(model: nn.Module, cfg: Any, payload: dict[str, Any], source: str, layout: ExportLayout,
              written: dict[str, Path], opset: int) -> dict[str, Any]:
    """``export.json``: everything a consumer of the graph needs besides the graph."""
    h, w = layout.image_size
    with torch.no_grad():  # the output shapes, read from one batch-1 forward
        shapes = [list(o.shape[1:]) for o in ExportableDetector(model, layout.image_size)(torch.zeros(1, 3, h, w))]
    t = model.transform
    return {
        "weights": source,
        "weights_sha256": payload["sha256"],
        "detector": layout.detector,
        "class_names": list(payload["class_names"]),
        "image_size": [h, w],
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, h, w], "dtype": "float32",
                  "meaning": "RGB in [0, 1], already resized to image_size by the caller; normalisation and "
                             "padding to a multiple of 32 are in the graph"},
        "outputs": [{"name": n, "shape": ["batch", *s]} for n, s in zip(layout.output_names, shapes)],
        "boxes": "x1, y1, x2, y2 in input pixels, one per anchor, not clipped",
        "scores": SCORE_FORMULA[layout.detector],
        "mean": list(t.image_mean),
        "std": list(t.image_std),
        "level_sizes": [list(s) for s in layout.level_sizes],
        "anchors_per_level": list(layout.anchors_per_level),
        "score_thresh": float(model.score_thresh),
        "topk_candidates": int(model.topk_candidates),
        "detections_per_img": int(cfg.model.detections_per_img),
        "nms": {"clb": cfg.nms.clb, "iou_threshold": cfg.nms.iou_threshold, "beta": cfg.nms.beta,
                "clb_score": cfg.nms.clb_score},
        "postprocess": "out of the graph: detector.export.postprocess",
        "files": {fmt: path.name for fmt, path in written.items()},
        "opset": opset if "onnx" in written else None,
        "onnx_exporter": "torch.onnx.export(dynamo=False)" if "onnx" in written else None,
        "dynamic_batch": True,
        "torch": torch.__version__,
    }


def _check_images(layout: ExportLayout, image: Path | None) -> torch.Tensor:
    """Tensor[2, 3, H, W]: the image (or a seeded random one) and its mirror: batch 2, so the check
    also runs the dynamic batch dimension."""
    h, w = layout.image_size
    if image is None:
        first = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    else:
        from PIL import Image
        from torchvision.transforms.functional import resize, to_tensor

        if not image.is_file():
            raise ConfigError(f"--check-image {str(image)!r}: no such file")
        first = resize(to_tensor(Image.open(image).convert("RGB")), [h, w], antialias=True).clamp(0, 1)
    return torch.stack([first, first.flip(-1)])


def _check(model: nn.Module, layout: ExportLayout, written: dict[str, Path], image: Path | None) -> bool:
    """Each written file against PyTorch on :func:`_check_images`: prints the max |diff| per output
    and whether the final detections agree; True when all are within the tolerances above."""
    images = _check_images(layout, image)
    with torch.no_grad():
        reference = ExportableDetector(model, layout.image_size)(images)
        want = model(list(images))
    ok = True
    for fmt, path in written.items():
        outputs = _run_exported(fmt, path, images)
        names = layout.output_names
        diffs = {n: float((torch.as_tensor(o) - r).abs().max()) for n, o, r in zip(names, outputs, reference)}
        close = all(diffs[n] <= RTOL * max(1.0, float(r.abs().max())) for n, r in zip(names, reference))
        got = postprocess(model, outputs, layout.image_size, layout)
        mismatch = detections_mismatch(got, want, BOX_ATOL, SCORE_ATOL)
        counts = "+".join(str(len(d["boxes"])) for d in want)
        print(f"check {fmt}: max |diff| " + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items())
              + ("" if close else f" (over {RTOL:g} relative)")
              + (f"; detections agree ({counts})" if mismatch is None else f"; detections DISAGREE: {mismatch}"))
        ok = ok and close and mismatch is None
    return ok


def _run_exported(fmt: str, path: Path, images: torch.Tensor) -> list[torch.Tensor]:
    """The exported file's outputs on ``images`` (onnxruntime on CPU, or the TorchScript module)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return list(torch.jit.load(str(path))(images))
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("--check on ONNX needs onnxruntime (pip install 'detlab[export]')") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: images.numpy()})]


__all__ = ["FILES", "FORMATS", "MANIFEST", "SETTABLE", "add_arguments", "build_model", "run"]
