"""Progress of long jobs: a bar on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import io

from bastion.gateway.progress import Progress, format_seconds, line, track


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_a_line_is_written_at_most_every_interval_and_once_at_the_end() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress("calibrate digits", 1000, "images", out, every_s=10, clock=clock) as progress:
        for _ in range(100):  # 100 advances of 10 images, one second apart
            clock.now += 1
            progress.advance(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # at 10 s, 20 s ... 100 s, then the final line
    first = "calibrate digits: 100/1,000 images (10 %), 10.0 images/s, about 1 min 30 s left"
    assert lines[0] == first
    assert lines[-1] == "calibrate digits: 1,000/1,000 images in 100 s (10.0 images/s)"
    assert "\x1b" not in out.getvalue()  # no terminal control codes in a log


def test_on_a_terminal_a_bar_shows_counts_and_an_eta() -> None:
    out = io.StringIO()
    with Progress("train digits", 40, "batches", out, terminal=True) as progress:
        for _ in range(40):
            progress.advance()
    text = out.getvalue()
    assert "train digits" in text and "40/40" in text and "batches" in text and "ETA" in text


def test_an_unknown_total_reports_the_count_and_rate_without_a_share() -> None:
    text = line("export", 1234, None, "records", 2.0, False)
    assert text == "export: 1,234 records, 617.0 records/s"


def test_track_yields_every_item_and_counts_them() -> None:
    out = io.StringIO()
    assert list(track(range(5), "attacks", stream=out, every_s=0)) == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[-1].startswith("attacks: 5/5 items in ")


def test_durations_read_as_a_person_would_say_them() -> None:
    assert [format_seconds(s) for s in (0, 59.6, 75, 3700)] == ["0 s", "1 min 0 s", "1 min 15 s",
                                                                 "1 h 1 min"]  # fmt: skip
