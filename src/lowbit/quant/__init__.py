"""quant stage of the lowbit pipeline."""
