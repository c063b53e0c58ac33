"""Progress display and per-phase timing for restore runs: one small API every stage calls.

A stage marks the work it does with the module-level `phase` context manager; nothing is passed around:

    from supir_rt.progress import phase

    with phase("encode"):                                   # a phase without steps
        latent = ...
    with phase("sampling", total=num_steps, unit="step") as p:
        for k in range(num_steps):
            ...
            p.advance()                                     # one step done

`phase` reports to the `Progress` that is active in the current context (``with progress:`` or
`Progress.activate`), and is a no-op (two clock reads) when none is. A new stage (tiling, say) only adds
``with phase("tiles", total=n, unit="tile")``; the display and the summary pick it up by name.

`Progress` keeps, per phase name, the total time and step count over the whole run (`totals`,
`summary_line`: the one-line summary ``supir-rt restore -v`` prints), and optionally draws one status
line on a terminal (``display=None``: only when the stream is a TTY):

    [1/3] sampling 12/50 steps 0.81 s/step ETA 31 s | overall ETA 1 min 42 s

* A phase's ETA excludes warm-up: the rate is measured from the end of its first step (the first
  call of a network often includes lazy initialisation, autotuning or allocation), so it is shown from
  the second step on.
* The overall ETA covers the rest of the run: what remains of the current phase, the phases still to
  come in this image (their durations in the previous image, once there is one), and the images still
  to come (the mean time per finished image, leaving out the first one, which pays the warm-up, once
  there are two).

Images are delimited with ``with progress.image(index, count):``; `Progress` is not thread-safe (one per
request, like `Restorer`).
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("supir_rt_progress", default=None)


def format_seconds(seconds: float) -> str:
    """``0.42 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Phase:
    """One running phase: ``advance()`` after each step; `eta` once the rate is known."""

    def __init__(self, owner: Progress | None, name: str, total: int | None, unit: str,
                 clock: Callable[[], float]) -> None:
        self.owner, self.name, self.total, self.unit, self.clock = owner, name, total, unit, clock
        self.done = 0
        self.started = clock()
        self._first_step_end: float | None = None  # end of the warm-up step
        self._last: float = self.started

    def advance(self, n: int = 1) -> None:
        now = self.clock()
        if self.done == 0:
            self._first_step_end = now
        self.done += n
        self._last = now
        if self.owner is not None:
            self.owner._refresh(self)

    def seconds_per_step(self) -> float | None:
        """Mean time per step after the first (warm-up) step; None until two steps are done."""
        if self._first_step_end is None or self.done < 2:
            return None
        return (self._last - self._first_step_end) / (self.done - 1)

    def eta(self) -> float | None:
        """Seconds left in this phase (None while unknown: no total, or still warming up)."""
        rate = self.seconds_per_step()
        if rate is None or self.total is None:
            return None
        return rate * max(self.total - self.done, 0)

    def elapsed(self) -> float:
        return self.clock() - self.started


class Progress:
    """Collects phase times for a run and (optionally) shows a status line; see the module docstring."""

    def __init__(self, *, display: bool | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter, min_interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.display = bool(isatty and isatty()) if display is None else display
        self.clock = clock
        self.min_interval = min_interval
        self.totals: dict[str, float] = {}  # phase name -> seconds, in first-seen order
        self.steps: dict[str, int] = {}  # phase name -> steps done
        self.units: dict[str, str] = {}  # phase name -> step unit
        self.image_index, self.image_count = 0, 1
        self.image_times: list[float] = []  # seconds per finished image
        self._image_phases: dict[str, float] = {}  # this image's phase durations
        self._last_image_phases: dict[str, float] = {}  # the previous image's
        self._image_start: float | None = None
        self._drawn = 0.0
        self._width = 0
        self._tokens: list[contextvars.Token] = []

    # ------------------------------------------------------------------------------------ activation

    def activate(self) -> contextvars.Token:
        """Make this the target of `phase` in the current context; undo with `deactivate(token)`."""
        return _ACTIVE.set(self)

    @staticmethod
    def deactivate(token: contextvars.Token) -> None:
        _ACTIVE.reset(token)

    def __enter__(self) -> Progress:
        self._tokens.append(self.activate())
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate(self._tokens.pop())
        self.clear()

    # ---------------------------------------------------------------------------------------- phases

    @contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "step") -> Iterator[Phase]:
        """Time ``name`` (accumulated over the run) and show it while it runs."""
        p = Phase(self, name, total, unit, self.clock)
        self._refresh(p, force=True)
        try:
            yield p
        finally:
            seconds = p.elapsed()
            self.totals[name] = self.totals.get(name, 0.0) + seconds
            self.steps[name] = self.steps.get(name, 0) + p.done
            self.units[name] = unit
            self._image_phases[name] = self._image_phases.get(name, 0.0) + seconds

    @contextmanager
    def image(self, index: int, count: int) -> Iterator[None]:
        """Delimit image ``index`` (0-based) of ``count``: per-image times feed the overall ETA."""
        self.image_index, self.image_count = index, count
        self._image_start = self.clock()
        self._image_phases = {}
        try:
            yield
        finally:
            self.image_times.append(self.clock() - self._image_start)
            self._last_image_phases = self._image_phases
            self._image_start = None

    # -------------------------------------------------------------------------------------- estimates

    def overall_eta(self, current: Phase) -> float | None:
        """Seconds left in the run (None while the current phase's ETA is unknown)."""
        left = current.eta()
        if left is None:
            left = 0.0 if current.total is None else None
        if left is None:
            return None
        seen = False
        for name, seconds in self._last_image_phases.items():  # phases after the current one
            if seen and name not in self._image_phases:
                left += seconds
            seen = seen or name == current.name
        remaining_images = self.image_count - self.image_index - 1
        if remaining_images > 0:
            finished = self.image_times[1:] if len(self.image_times) >= 2 else self.image_times
            if finished:
                per_image = sum(finished) / len(finished)
            elif self._image_start is not None:
                per_image = self.clock() - self._image_start + left
            else:
                return None
            left += remaining_images * per_image
        return left

    # ---------------------------------------------------------------------------------------- display

    def status_line(self, p: Phase) -> str:
        parts = [f"[{self.image_index + 1}/{self.image_count}]" if self.image_count > 1 else "", p.name]
        if p.total is not None:
            parts.append(f"{p.done}/{p.total} {p.unit}s")
        rate = p.seconds_per_step()
        if rate is not None:
            parts.append(f"{rate:.2f} s/{p.unit}")
            eta = p.eta()
            if eta is not None:
                parts.append(f"ETA {format_seconds(eta)}")
        elif p.total is not None and p.done <= 1:
            parts.append("(warming up)")
        overall = self.overall_eta(p)
        if overall is not None and (p.total is not None or self.image_count > 1):
            parts.append(f"| overall ETA {format_seconds(overall)}")
        return " ".join(x for x in parts if x)

    def _refresh(self, p: Phase, force: bool = False) -> None:
        if not self.display:
            return
        now = self.clock()
        if not force and now - self._drawn < self.min_interval and p.done != p.total:
            return
        self._drawn = now
        line = self.status_line(p)
        pad = max(self._width - len(line), 0)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def clear(self) -> None:
        """Erase the status line (before printing anything else on the terminal)."""
        if self.display and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    # ---------------------------------------------------------------------------------------- summary

    def summary_line(self) -> str:
        """``time: load 3.1 s, encode 0.42 s, sampling 12 s (50 steps, 0.24 s/step), ... total 16 s``."""
        parts = []
        for name, seconds in self.totals.items():
            steps, unit = self.steps.get(name, 0), self.units.get(name, "step")
            extra = f" ({steps} {unit}s, {seconds / steps:.2f} s/{unit})" if steps > 1 else ""
            parts.append(f"{name} {format_seconds(seconds)}{extra}")
        total = sum(self.totals.values())
        return "time: " + ", ".join(parts) + f"; total {format_seconds(total)}"


class _NoPhase:
    """What `phase` yields when no `Progress` is active: ``advance`` does nothing."""

    done = 0

    def advance(self, n: int = 1) -> None:
        pass


_NO_PHASE = _NoPhase()


@contextmanager
def phase(name: str, total: int | None = None, unit: str = "step") -> Iterator[Phase | _NoPhase]:
    """Mark a phase of work for the active `Progress` (a no-op when none is active)."""
    progress = _ACTIVE.get()
    if progress is None:
        yield _NO_PHASE
        return
    with progress.phase(name, total, unit) as p:
        yield p


def active() -> Progress | None:
    """The `Progress` `phase` reports to in this context, if any."""
    return _ACTIVE.get()


__all__ = ["Phase", "Progress", "active", "format_seconds", "phase"]
