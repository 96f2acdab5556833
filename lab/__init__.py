"""detlab's experiment platform: tracking, jobs, sweeps and the paper's tables."""
