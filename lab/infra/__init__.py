"""Where jobs run and keep their state: storage URIs every node reaches (``storage``), the Ray nodes a run used
(``nodes``), and ``detlab cluster up|down|status`` (``cluster``, ``procs``)."""
