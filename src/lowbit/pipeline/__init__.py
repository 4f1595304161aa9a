"""Orchestration above quant/ and formats/: build candidates, measure them, decide, report."""
