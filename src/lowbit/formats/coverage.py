"""The one check every writer runs before its output is renamed into place: nothing was dropped.

A source tensor is carried either as it is (same name in the writer's naming) or, when it was
quantized, as its packed form (for example X.weight -> X.qweight, or a GGUF block tensor under
llama.cpp's name). A writer that would leave one out refuses with the tensor's name instead of
producing a file that a loader silently "repairs" (transformers re-initialises a missing bias).
"""

from __future__ import annotations

from typing import Callable, Collection, Iterable

from lowbit.errors import LowbitError


def missing_tensors(source: Iterable[str], written: Collection[str], stands_for: Callable[[str], str]) -> list[str]:
    """Source names whose written counterpart `stands_for(name)` is not among `written`."""
    present = set(written)
    return [name for name in source if stands_for(name) not in present]


def check_nothing_dropped(source: Iterable[str], written: Collection[str], stands_for: Callable[[str], str],
                          what: str) -> None:
    """Raise a one-line LowbitError naming the first tensors `what` (a writer) would drop."""
    lost = missing_tensors(source, written, stands_for)
    if lost:
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        raise LowbitError(f"{what} would drop tensor(s) {', '.join(lost[:3])}{more}; nothing was written "
                          "(this is a lowbit bug: please report it with the model's config.json)")
