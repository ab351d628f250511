"""Progress for every step that takes more than a couple of seconds: tqdm bars on stderr, drawn only when
stderr is a terminal (logs, pipes and CI stay clean), gone once the step is done (its result line stays)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tqdm

REFRESH_S = 0.5


def bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "img",
    initial: int = 0,
    show: bool = True,
) -> tqdm.tqdm:
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand), shown on terminals only (and never where
    ``show`` is False: the other processes of a multi-process run)."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        initial=initial,
        file=sys.stderr,
        disable=None if show else True,
        leave=False,
        mininterval=REFRESH_S,
        dynamic_ncols=True,
    )


@contextmanager
def working(desc: str) -> Iterator[None]:
    """For one long call with no steps to count (an ONNX export): the step's name and a running clock."""
    from tqdm.auto import tqdm

    clock = tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr, disable=None, leave=False)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(REFRESH_S):
            clock.refresh()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    if not clock.disable:
        ticker.start()
    try:
        yield
    finally:
        done.set()
        if ticker.is_alive():
            ticker.join()
        clock.close()
