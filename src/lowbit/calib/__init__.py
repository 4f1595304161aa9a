"""calib stage of the lowbit pipeline."""
