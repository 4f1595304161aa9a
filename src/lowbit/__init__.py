"""lowbit: quantize Llama-family checkpoints to 2-8 bits, measure the loss, decide, export."""

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402

__all__ = ["LowbitError", "__version__", "calibration", "quantize", "evaluate", "compare", "decide", "run", "memory",
           "rotate"]


def __getattr__(name: str):
    """The API functions load lazily: `import lowbit` stays cheap (no torch) for the CLI's --help."""
    if name in __all__[2:]:
        from lowbit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
