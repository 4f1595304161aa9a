"""lowbit: quantize Llama-family checkpoints to 2-8 bits, measure the loss, decide, export."""

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402

__all__ = ["LowbitError", "__version__", "evaluate", "compare", "decide", "memory", "rotate"]


def __getattr__(name: str):
    """The API functions load lazily: `import lowbit` stays cheap (no torch) for the CLI's --help."""
    if name in ("evaluate", "compare", "decide", "memory", "rotate"):
        from lowbit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
