"""Progress bars for the loops a person waits for (tqdm), off when ``enabled`` is False."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable, total: int, desc: str, enabled: bool = True, unit: str = "layer"):
    """``iterable`` wrapped in a tqdm bar that disappears when done, or as is when disabled."""
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
