"""The live terminal UI (rich). The only module that imports ``rich.live``.

The view is a pure function of a :class:`RunStatus` and the terminal size
(:func:`render_status`), laid out to fit: at 80x24 it shows every class with
its count, percentage and 95 % interval, the progress bar, rates, flags and
warnings, giving up optional lines (source, group totals, recent cells) before
it would cut a class row; flags that do not fit are summarised as "+N more".
Wide and tall terminals get proportion bars, group totals and the last cells.

Keys (read without blocking from a terminal in cbreak mode; nothing happens
when stdin is not a terminal): ``q`` quit (the queued cells are classified and
saved, reports written), ``p`` pause / resume, ``r`` reset (asks; ``y`` confirms),
``s`` save a snapshot of the reports.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from hemaedge.edge.bundle.vocabulary import display_name
from hemaedge.edge.display.status import REVIEW, RunStatus, display_order
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

KEYS_HELP = "[b]q[/] quit+save  [b]p[/] pause  [b]r[/] reset  [b]s[/] snapshot"
STATE_STYLE = {
    "counting": "green",
    "paused": "yellow",
    "stopping": "yellow",
    "done": "bold green",
    "ended": "cyan",
    "stopped": "cyan",
    "failed": "bold red",
    "starting": "dim",
}
WIDE = 100  # from this width: proportion bars and a side panel
TALL = 34  # from this height: group totals and recent cells


def _fmt_ci(lo: float, hi: float) -> str:
    return f"{lo:4.1f}-{hi:4.1f}"


def _lines(text: str, width: int) -> int:
    return max(1, math.ceil(len(text) / max(1, width)))


def _class_table(st: RunStatus, width: int, bars: bool) -> Table:
    snap = st.snapshot
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), expand=False, header_style="bold")
    name_w = max([len(display_name(c)) for c in st.classes] + [len("review (<0.60)")])
    t.add_column("class", no_wrap=True, min_width=min(name_w, 24), max_width=max(name_w, 12))
    t.add_column("n", justify="right", no_wrap=True, min_width=3)
    t.add_column("%", justify="right", no_wrap=True, min_width=5)
    t.add_column("95% CI", justify="right", no_wrap=True, min_width=13)
    bar_w = max(0, width - name_w - 3 - 5 - 13 - 10) if bars else 0
    if bar_w >= 10:
        t.add_column("", no_wrap=True, width=min(bar_w, 40))
    n = snap.total

    def row(name: str, label: str, k: int, style: str = "", bar_style: str = "bar.complete") -> None:
        pct = None
        if name in st.not_estimated:
            cells = ["-", "", "not estimated"]
        elif name in snap.percentages:
            pct = snap.percentages[name]
            lo, hi = snap.intervals[name]
            cells = [str(k), f"{pct:5.1f}", _fmt_ci(lo, hi)]
        else:  # outside the differential: per 100 white cells, not a percentage of them
            per = 100.0 * k / n if n else 0.0
            cells = [str(k), "", f"{per:.1f} /100 WBC"]
        if bar_w >= 10:
            cells.append(
                ProgressBar(total=1.0, completed=(pct or 0.0) / 100.0, width=min(bar_w, 40), complete_style=bar_style)
            )
        t.add_row(Text(label, style=style), *cells)

    in_differential = dict(zip(st.classes, st.differential))
    for c in display_order(st.classes, st.differential):
        if c == REVIEW:
            row(REVIEW, f"review (<{st.review_threshold:.2f})", snap.review, "yellow", "yellow")
        else:
            row(c, display_name(c), snap.counts.get(c, 0), "" if in_differential[c] else "dim")
    return t


def _header(st: RunStatus) -> Text:
    t = Text()
    t.append("hemaedge ", style="bold")
    t.append(st.state, style=STATE_STYLE.get(st.state, ""))
    t.append(f" | {st.backend} {st.precision}".rstrip())
    if st.session:
        t.append(f" | {os.path.basename(str(st.session).rstrip('/'))}", style="dim")
    return t


def _progress(st: RunStatus, width: int) -> Table:
    snap = st.snapshot
    g = Table.grid(padding=(0, 1))
    label = f"{snap.total}/{snap.target} WBC"
    g.add_column(no_wrap=True)
    g.add_column(no_wrap=True)
    g.add_column(no_wrap=True, justify="right")
    pct = f"{min(100.0, 100.0 * snap.total / max(1, snap.target)):3.0f} %"
    bar_w = max(5, width - len(label) - len(pct) - 2)
    g.add_row(
        Text(label, style="bold"),
        ProgressBar(total=snap.target, completed=min(snap.total, snap.target), width=bar_w),
        pct,
    )
    return g


def _rates(st: RunStatus) -> str:
    parts = [f"{st.fps:.1f} frames/s", f"{st.cells_per_s:.1f} cells/s", f"frames {st.frames}"]
    skipped = ", ".join(f"{'blur/exposure' if k == 'quality' else k} {v}" for k, v in sorted(st.skipped.items()) if v)
    if skipped:
        parts.append(f"skipped: {skipped}")
    if st.inputs_unusable:
        parts.append(f"unusable images {st.inputs_unusable}")
    if st.at_edge:
        parts.append(f"at border {st.at_edge} (counted later)")
    return " | ".join(parts)


def _groups_line(st: RunStatus) -> str:
    """Group totals, only when some group merges several classes (else the table already says it)."""
    if len(st.snapshot.group_counts) >= len([c for c, d in zip(st.classes, st.differential) if d]):
        return ""
    shown = [f"{st.group_labels.get(k, k)} {v}" for k, v in st.snapshot.group_counts.items()]
    return "groups: " + " | ".join(shown) if shown else ""


def render_status(st: RunStatus, width: int = 80, height: int = 24, confirm_reset: bool = False) -> RenderableType:
    """Lay out the whole screen for a terminal of ``width`` x ``height``.

    Returns a renderable that is at most ``height`` lines tall when rendered at ``width``
    (as long as the class table itself fits), never truncating class rows or numbers.
    """
    wide = width >= WIDE
    tall = height >= TALL
    table = _class_table(st, width if not wide else min(width, 110), bars=wide)
    n_rows = 2 + len(st.classes) + 1  # header + rule + classes + review
    head = [_header(st), _progress(st, min(width, 110) if wide else width)]
    rates = Text(_rates(st), style="dim")
    if confirm_reset:
        keys = Text.from_markup("[bold yellow]reset the count? press y to confirm, any other key cancels[/]")
    elif st.message:
        keys = Text(st.message, style="cyan")
    else:
        keys = Text.from_markup(KEYS_HELP + ("  [yellow](paused)[/]" if st.state == "paused" else ""))
    fixed = len(head) + n_rows + _lines(rates.plain, width) + 1
    budget = height - fixed
    extra: list[RenderableType] = []
    notes: list[tuple[str, str]] = []
    if st.triage:  # the slide call goes first: it is what a clinician acts on
        urgent = "ACUTE" in st.triage or "CHRONIC" in st.triage
        notes.append((st.triage, "bold red" if urgent else "bold"))
    notes += [(f"! {w}", "bold yellow") for w in st.warnings]
    notes += [(f"* {f}", "bold red" if f.startswith("BLAST") else "magenta") for f in st.snapshot.flags]
    shown: list[Text] = []
    used = 0
    for i, (text, style) in enumerate(notes):
        need = _lines(text, width)
        rest = len(notes) - i - 1
        if used + need + (1 if rest else 0) > budget:
            more = len(notes) - i
            shown.append(
                Text(f"+{more} more flag{'s' * (more != 1)}/warning{'s' * (more != 1)} (see report)", style="magenta")
            )
            used += 1
            break
        shown.append(Text(text, style=style))
        used += need
    budget -= used
    if st.note and budget >= _lines(st.note, width):
        extra.append(Text(st.note, style="yellow"))
        budget -= _lines(st.note, width)
    if st.source and budget >= _lines(f"source: {st.source}", width):
        extra.append(Text(f"source: {st.source}", style="dim"))
        budget -= _lines(f"source: {st.source}", width)
    gl = _groups_line(st)
    if tall and gl:
        if budget >= _lines(gl, width):
            extra.append(Text(gl))
            budget -= _lines(gl, width)
    body: list[RenderableType] = [*head, table, *shown, rates, *extra]
    if wide and tall and st.recent and budget >= 0:
        recent = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=None, header_style="bold")
        recent.add_column("last cells", no_wrap=True)
        recent.add_column("class", no_wrap=True)
        recent.add_column("p", justify="right", no_wrap=True)
        for rc in reversed(st.recent[-max(1, min(len(st.recent), n_rows - 2)) :]):
            recent.add_row(f"#{rc.id} {rc.frame}"[:28], rc.bucket, f"{rc.confidence:.2f}")
        side = Table.grid(padding=(0, 3))
        side.add_column()
        side.add_column()
        side.add_row(table, recent)
        body = [*head, side, *shown, rates, *extra]
    body.append(keys)
    return Group(*body)


class KeyReader:
    """Single keys from stdin without blocking (termios cbreak); a no-op when stdin is not a terminal."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stdin
        self.fd: int | None = None
        self._saved: Any = None

    def __enter__(self) -> KeyReader:
        try:
            import termios
            import tty

            if self.stream.isatty():
                self.fd = self.stream.fileno()
                self._saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
        except (ImportError, OSError, ValueError, AttributeError):  # no termios (Windows) or no real stdin
            self.fd = None
        return self

    def read(self) -> str | None:
        """The next key pressed, or None."""
        if self.fd is None:
            return None
        import select

        ready, _, _ = select.select([self.fd], [], [], 0)
        if not ready:
            return None
        data = os.read(self.fd, 32)
        return data.decode(errors="ignore")[:1] or None

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        self.fd = None


def run_live(
    session: Any, console: Console, snapshot: Callable[[], str], refresh_s: float = 0.2, keys: KeyReader | None = None
) -> None:
    """Run a counting session under the live TUI until it ends or ``q`` is pressed.

    Args:
        session: Has ``start()``, ``stop()``, ``toggle_pause()``, ``reset()``, ``running()``,
            ``wait(timeout)`` and ``status(message) -> RunStatus`` (a ``CountingSession``).
        console: Where to draw.
        snapshot: Saves a snapshot of the reports; returns a one-line message.
        refresh_s: Redraw interval.
        keys: Key source (default: stdin).
    """
    confirm = False
    message, message_until = "", 0.0

    def view() -> RenderableType:
        msg = message if time.monotonic() < message_until else ""
        return render_status(session.status(msg), console.size.width, console.size.height, confirm)

    with keys or KeyReader() as reader, Live(
        get_renderable=view,
        console=console,
        screen=True,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        session.start()
        try:
            while session.running():
                key = reader.read()
                if key is not None:
                    key = key.lower()
                    if confirm:
                        confirm = False
                        if key == "y":
                            session.reset()
                            message, message_until = "count reset", time.monotonic() + 3
                        else:
                            message, message_until = "reset cancelled", time.monotonic() + 2
                    elif key == "q":
                        session.stop()
                        message, message_until = "stopping: saving the queued cells...", time.monotonic() + 60
                    elif key == "p":
                        paused = session.toggle_pause()
                        message, message_until = ("paused" if paused else "resumed"), time.monotonic() + 2
                    elif key == "r":
                        confirm = True
                    elif key == "s":
                        message, message_until = snapshot(), time.monotonic() + 4
                live.refresh()
                session.wait(refresh_s)
        except KeyboardInterrupt:
            session.stop()
            session.wait()
            raise
        live.refresh()
