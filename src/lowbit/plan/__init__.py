"""plan stage of the lowbit pipeline."""
