"""lowbit: quantize Llama-family checkpoints to 2-8 bits, measure the loss, decide, export."""

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402

__all__ = ["LowbitError", "__version__"]
