"""eval stage of the lowbit pipeline."""
