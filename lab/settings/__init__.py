"""What a job is told: ``LabConfig`` and its profiles (``profiles/*.yaml``), the options every job takes, and the
scrubbing that keeps credentials out of what is logged. The bottom room: it imports no other part of ``lab``."""
