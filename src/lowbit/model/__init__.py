"""model stage of the lowbit pipeline."""
