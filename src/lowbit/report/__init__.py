"""report stage of the lowbit pipeline."""
