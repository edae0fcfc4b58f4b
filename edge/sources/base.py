"""What every frame source is: a context manager and an iterable of ``Frame``s.

Sources report what happens to them (a read timed out, a file was skipped, the
camera is being reopened) as ``SourceEvent``s through an ``on_event`` callback
and keep the latest one in ``status`` / ``last_event`` so a UI can show it.
A timeout is not an error; end of stream ends iteration; a source that has
failed for good raises ``SourceError``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable  # typing's: EventCallback below is evaluated at run time (Python 3.8)

from hemaedge.edge.records import Frame

#: Event kinds a source emits.
#: ``opened``, ``timeout`` (a read gave nothing; skipped), ``skipped`` (a corrupt
#: file), ``lost`` (a live camera dropped out), ``reconnecting`` (attempt N of M),
#: ``reconnected``, ``failed`` (gave up), ``ended`` (end of stream).
EVENT_KINDS = ("opened", "timeout", "skipped", "lost", "reconnecting", "reconnected", "failed", "ended")


@dataclass(frozen=True)
class SourceEvent:
    """Something a source wants the pipeline (and the person) to know.

    Attributes:
        kind: One of ``EVENT_KINDS``.
        message: One line for people.
        source_id: The source's URI.
        attempt: Reconnect attempt number (``reconnecting`` only), else 0.
        delay_s: Seconds waited before this attempt (``reconnecting`` only).
        time: ``time.time()`` when it happened.
        subject: The file concerned (``skipped`` only), else ``""``.
    """

    kind: str
    message: str
    source_id: str
    attempt: int = 0
    delay_s: float = 0.0
    time: float = field(default_factory=time.time)
    subject: str = ""

    @property
    def is_warning(self) -> bool:
        """Whether a person should see it as a warning."""
        return self.kind in ("timeout", "skipped", "lost", "reconnecting", "failed")


EventCallback = Callable[[SourceEvent], None]


def print_warning(event: SourceEvent) -> None:
    """The default ``on_event``: warnings as one line on stderr, the rest silent."""
    if event.is_warning and event.kind != "timeout":
        print(f"warning: {event.message}", file=sys.stderr)


class FrameSource:
    """Base of every source: ``with open_source(uri) as src: for frame in src: ...``.

    Subclasses implement ``_open()``, ``_frames()`` and ``_close()``. The
    constructor is cheap and touches no hardware; ``__enter__`` opens.

    Attributes:
        uri: Where the frames come from (used as ``Frame.source_id``).
        live: True for cameras and streams (frames keep coming; drop-outs are retried).
        status: ``"idle"``, ``"ok"``, ``"reconnecting"``, ``"ended"``, ``"failed"`` or ``"closed"``.
        last_event: The latest ``SourceEvent`` or ``None``.
        colour_order: Channel order of the frames it yields.
    """

    live: bool = False
    colour_order: str = "BGR"

    def __init__(self, uri: str, on_event: EventCallback | None = None) -> None:
        self.uri = uri
        self.on_event: EventCallback = on_event if on_event is not None else print_warning
        self.status = "idle"
        self.last_event: SourceEvent | None = None
        self._opened = False

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> FrameSource:
        """Open the source (idempotent). Raises ``SourceError`` if it cannot."""
        if not self._opened:
            self._open()
            self._opened = True
            self.status = "ok"
        return self

    def close(self) -> None:
        """Release the source (idempotent)."""
        if self._opened:
            self._opened = False
            self._close()
        self.status = "closed"

    def __iter__(self) -> Iterator[Frame]:
        self.open()
        yield from self._frames()
        if self.status == "ok":
            self.status = "ended"

    # -- for subclasses ------------------------------------------------------
    def _open(self) -> None:
        """Acquire resources."""

    def _close(self) -> None:
        """Release resources."""

    def _frames(self) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def emit(self, kind: str, message: str, **extra: float | str) -> SourceEvent:
        """Record and report an event."""
        event = SourceEvent(kind, message, self.uri, **extra)  # type: ignore[arg-type]
        self.last_event = event
        self.on_event(event)
        return event

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, status={self.status!r})"
