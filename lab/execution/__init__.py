"""Running cells: the driver's runner and each cell's MLflow run (``runner``, ``cellruns``, ``lease``), the pretraining
stage (``pretrain``), Ray Train around one cell (``train``) and the loop on each worker (``loop``, ``schedule``,
``worker``, ``evaluation``), and what keeps a cell alive through faults (``resume``, ``runlog``, ``faults``,
``workerenv``)."""

import os

# Set before any module of this room imports ray.train. V2 is the default in Ray 2.60; pin it so an inherited
# RAY_TRAIN_V2_ENABLED=0 cannot flip the API. Train's print patch sends print() both to stdout and to its logger,
# so every progress line reached the driver twice; Ray propagates this variable from the process calling fit() to
# the workers.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
