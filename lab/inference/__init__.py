"""Using trained weights: ``detlab eval`` (``evalcmd``) and ``detlab export`` (``export``)."""
