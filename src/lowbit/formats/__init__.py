"""formats stage of the lowbit pipeline."""
