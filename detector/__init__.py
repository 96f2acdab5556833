"""detlab's science: RetinaNet with IAC assignment, DC loss and CL-B NMS (pure PyTorch/torchvision).

Importing neither Ray nor MLflow, it can be used from a notebook::

    from detector.config import DetectorConfig
    from detector.model import build_detector
    cfg = DetectorConfig(); cfg.model.num_classes = 5
    model = build_detector(cfg)
"""
