"""Progress meters: a tqdm bar on a terminal; off one, periodic one-line INFO records with count,
rate and ETA (tqdm's own formatting), and a last line on close; nothing when disabled."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from retrieval import progress as progress_module
from retrieval.progress import LogProgress, meter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_lines_come_at_most_every_interval_and_once_at_the_end(clock, caplog):
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    with meter(8000, "encode images", "img", interval_s=10) as bar:
        assert isinstance(bar, LogProgress)
        for _ in range(45):  # 100 images per second, 45 updates of 100 over 45 s
            clock.now += 1
            bar.update(100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "encode images: 1000/8000 (12.5%), 100.00img/s, ETA 01:10",
        "encode images: 2000/8000 (25.0%), 100.00img/s, ETA 01:00",
        "encode images: 3000/8000 (37.5%), 100.00img/s, ETA 00:50",
        "encode images: 4000/8000 (50.0%), 100.00img/s, ETA 00:40",
        "encode images: 4500/8000 (56.2%), 100.00img/s, ETA 00:35",  # on close: what it had not told yet
    ]
    assert not any("\r" in line for line in lines)


def test_a_resumed_meter_rates_only_its_own_work_and_shows_its_postfix(clock, caplog):
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    bar = meter(10, "epochs", "epoch", initial=6, interval_s=30)
    clock.now += 20
    bar.set_postfix(loss="0.512")
    bar.update(2)
    assert caplog.records == []  # 20 s < 30 s
    bar.close()
    bar.close()  # closing twice logs once
    assert [r.getMessage() for r in caplog.records] == ["epochs: 8/10 (80.0%), 10.00s/epoch, ETA 00:20, loss=0.512"]
    with meter(10, "epochs", "epoch", initial=6):
        pass  # nothing done, nothing to tell
    assert len(caplog.records) == 1


def test_an_unknown_total_counts_without_an_eta(clock, caplog):
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    with meter(None, "hash images", "file") as bar:
        clock.now += 4
        bar.update(10)
    assert [r.getMessage() for r in caplog.records] == ["hash images: 10 file,  2.50file/s"]  # tqdm pads rates


def test_a_terminal_gets_a_tqdm_bar_and_disabled_gets_silence(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    monkeypatch.setattr(progress_module.sys, "stderr", Terminal())
    with meter(10, "encode", "img") as bar:
        assert isinstance(bar, tqdm) and not bar.disable
        bar.update(10)
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    with meter(10, "encode", "img", enabled=False) as bar:
        assert isinstance(bar, tqdm) and bar.disable
        bar.update(10)
    assert caplog.records == []
