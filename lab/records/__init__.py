"""What MLflow keeps: the store and its tags (``tracking``), what produced a run (``provenance``), logged models
and weights sources (``models``), learning curves drawn from metric histories (``curves``)."""
