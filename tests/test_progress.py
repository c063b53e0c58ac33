"""`supir_rt.progress`: phase timing, the warm-up-free ETA, the overall ETA, the status line and the
``-v`` summary, with a fake clock whose readings the tests choose (expected values are worked out by hand
in the comments)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from supir_rt import cli
from supir_rt.progress import Progress, active, format_seconds, phase


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_excludes_the_warm_up_step():
    clock = Clock()
    progress = Progress(display=False, clock=clock)
    with progress.phase("sampling", total=10) as p:
        clock.now = 5.0  # step 1 takes 5 s (warm-up)
        p.advance()
        assert p.eta() is None  # unknown until a step after the warm-up
        clock.now = 5.5  # steps 2..3 take 0.5 s each
        p.advance()
        clock.now = 6.0
        p.advance()
        assert p.seconds_per_step() == 0.5
        assert p.eta() == 0.5 * 7  # 7 steps left at 0.5 s, the 5 s warm-up left out
    assert progress.totals == {"sampling": 6.0} and progress.steps == {"sampling": 3}


def test_overall_eta_uses_later_phases_and_later_images():
    clock = Clock()
    progress = Progress(display=False, clock=clock)
    for index in range(3):
        with progress.image(index, 3):
            with progress.phase("encode"):
                clock.now += 1.0
            with progress.phase("sampling", total=4) as p:
                for step in range(4):
                    clock.now += 3.0 if step == 0 else 1.0
                    p.advance()
                    if index == 1 and step == 1:
                        # phase: 2 steps left at 1 s = 2 s; decode after it took 2 s in image 0;
                        # one image to come at the mean of finished images = image 0 only: 1+6+2 = 9 s
                        assert progress.overall_eta(p) == 2.0 + 2.0 + 9.0
            with progress.phase("decode"):
                clock.now += 2.0
    assert progress.image_times == [9.0, 9.0, 9.0]
    assert progress.totals == {"encode": 3.0, "sampling": 18.0, "decode": 6.0}


def test_status_line_and_summary():
    clock, stream = Clock(), io.StringIO()
    progress = Progress(display=True, stream=stream, clock=clock, min_interval=0.0)
    with progress.phase("load"):
        clock.now = 2.0
    with progress.phase("sampling", total=3) as p:
        for t in (4.0, 5.0, 6.0):
            clock.now = t
            p.advance()
    assert "sampling 1/3 steps (warming up)" in stream.getvalue()
    assert "sampling 2/3 steps 1.00 s/step ETA 1.0 s | overall ETA 1.0 s" in stream.getvalue()
    assert progress.summary_line() == "time: load 2.0 s, sampling 4.0 s (3 steps, 1.33 s/step); total 6.0 s"
    progress.clear()
    assert stream.getvalue().endswith("\r")


def test_phase_without_an_active_progress_is_a_no_op():
    assert active() is None
    with phase("anything", total=3) as p:
        p.advance()
    progress = Progress(display=False)
    with progress:
        assert active() is progress
        with phase("encode"):
            pass
    assert active() is None and "encode" in progress.totals


def test_format_seconds():
    assert [format_seconds(s) for s in (0.42, 3.25, 42, 185, 3720)] == ["0.42 s", "3.2 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_verbose_prints_one_line_per_phase_summary(tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8), "RGB").save(src)
    code = cli.main(["restore", str(src), "-o", str(tmp_path / "o.png"), "--tiny-random", "--steps", "2",
                     "--min-size", "64", "-v", "-q"])
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("time: ")]
    assert len(lines) == 1
    for name in ("load ", "encode ", "sampling ", "(2 steps", "decode ", "save ", "total "):
        assert name in lines[0], lines[0]
