"""Progress meters that read well wherever they go: a tqdm bar on a terminal, and off one (a log
file, a container's output, a pipe) a line every `interval_s` seconds and one at the end, as INFO
records of the `retrieval.progress` logger:

    encode images: 4096/8091 (50.6%), 112.22img/s, ETA 00:35

instead of thousands of carriage-return frames. The line is tqdm's own `format_meter`, so both
forms count, time and estimate alike.

    with meter(len(paths), "encode images", "img", enabled=show) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Protocol

from tqdm import tqdm

log = logging.getLogger("retrieval.progress")

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.1f}%), {rate_fmt}, ETA {remaining}{postfix}"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit}, {rate_fmt}{postfix}"


class Progress(Protocol):
    """What both forms offer (a subset of tqdm's interface)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: Any) -> Any: ...


def meter(
    total: int | None, desc: str, unit: str = "it", enabled: bool = True, *, initial: int = 0, interval_s: float = 10.0
) -> Progress:
    """A progress meter of `total` units (None: unknown) starting at `initial`: a tqdm bar when
    stderr is a terminal, else a `LogProgress` that logs at most every `interval_s` seconds;
    a silent one when not `enabled`."""
    if enabled and not _stderr_is_a_terminal():
        return LogProgress(total, desc, unit, initial=initial, interval_s=interval_s)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled)


def quiet_library_progress_bars() -> None:
    """Turn off the bars the Hugging Face libraries draw while loading a model (transformers'
    'Loading weights', huggingface_hub's downloads): a server's log has no use for them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub at import
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    transformers_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except ValueError:  # a closed stream
        return False


class LogProgress:
    """Counts like a tqdm bar; logs one line when at least `interval_s` seconds have passed since
    the last one, and on close a last one for what it has not told yet. (Hand-written around
    tqdm's formatter: a tqdm bar writing to a logger would still emit '\\r' frames, start a
    monitor thread and join its global list of bars.)"""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        interval_s: float = 10.0,
        logger: logging.Logger = log,
    ):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.n = initial
        self.interval_s, self.logger = interval_s, logger
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self._logged_n = initial
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._log(now)

    def _log(self, now: float) -> None:
        self._last, self._logged_n = now, self.n
        self.logger.info("%s", self.line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.start
        return tqdm.format_meter(
            self.n,
            self.total,
            elapsed,
            prefix=self.desc,
            unit=self.unit,
            initial=self.initial,
            postfix=self.postfix or None,
            bar_format=LINE_FORMAT if self.total else LINE_FORMAT_NO_TOTAL,
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self._logged_n:  # else the last line said it all
                self._log(time.monotonic())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
