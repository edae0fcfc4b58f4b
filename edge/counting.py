"""The station pipeline: frames -> quality -> cells -> crops -> classify -> store -> count -> display.

Two threads do the work, so capture never waits on inference::

    capture thread                                   classification worker
    --------------                                   ---------------------
    frame = next(source)                             item = queue.get()
    quality check (skip blurred / badly exposed)     preprocess(all crops of the frame) -> ONE batch
    register stage motion (always)                   backend.classify(batch)
    if the queue is full: SKIP the frame  -------->  store: rows + crop PNGs, fsync, commit
    segment, keep only cells not seen before         count, then show (callbacks, status)
    cut crops (bundle's crop geometry)
    queue.put_nowait(frame's new cells)

Skip policy for live sources (explicit and counted in ``skipped["busy"]``):
when the bounded queue is full the capture thread still registers the frame's stage motion, so
slide coordinates stay right, but does not segment it and remembers none of
its cells. Nothing that was queued is ever dropped, so no cell is lost: a cell
in a skipped frame is still in view in the next frames (a camera gives 30 per
second) and is found there. Sources that can wait (image files, videos, the
synthetic slide) are not skipped: capture waits for room in the queue, so every
frame is segmented and the count does not depend on timing. A cell is counted
and shown only after its row and crop are durably stored.

Platelets (``platelets=True``, ``hemaedge count --platelets``; otherwise reported as "not estimated"):
the segmenter is asked for platelets too; they are tracked, cut (as large as a white cell's crop, see
``PLATELET_TO_WBC``), classified and stored like white cells, and counted only
when the classifier calls them platelets (``CountingSession``). The counter
keeps them out of the white-cell target (platelets per 100 white cells).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hemaedge.edge.count import DifferentialCounter, SlideTracker
from hemaedge.edge.count.tracking import Keyframe
from hemaedge.edge.count.triage import Triage, triage
from hemaedge.edge.display.status import RecentCell, RunStatus
from hemaedge.edge.records import CellKind, Prediction, SessionState, SkippedInput, SkipReason
from hemaedge.edge.station import CellFinder, Found, Station, classify_crops
from hemaedge.edge.store import NewCell, SessionStore, StoredCell
from hemaedge.edge.store.crop_folder import CropFolder

QUEUE_FRAMES = 4  # frames with new cells that may wait for classification before capture skips frames
RATE_WINDOW_S = 3.0
WARNING_HOLD_S = 4.0


# ---------------------------------------------------------------------------------------------------------------------
# restoring a session
# ---------------------------------------------------------------------------------------------------------------------
def restore(store: SessionStore, counter: DifferentialCounter, tracker: SlideTracker) -> list[StoredCell]:
    """Rebuild the count and the known slide positions from a session store (for ``--resume``).

    Returns:
        The cells of the current epoch, in the order they were counted.
    """
    cells = store.read_cells()
    counter.reset()
    for c in cells:
        counter.add(c.class_index, c.review)
    tracker.restore(
        ((c.field, c.sx, c.sy, c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in cells), store.read_keyframes()
    )
    return cells


# ---------------------------------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    found: Found
    keyframes: list[Keyframe]


_RESET = object()
_END = object()


@dataclass
class InputLog:
    """What became of the inputs: nothing unread or unused goes unmentioned.

    Attributes:
        total: Inputs the source holds (still images: the files; a stream: None, unknown).
        read: Frames read from the source.
        used: Frames segmented (the rest were skipped: unreadable, quality, busy).
        unusable: Still images not used, each named with its reason (unreadable files, and frames the quality
            check refused: greyscale, too small, out of focus, badly exposed).
        quality: Frames refused by the quality check, by reason (all sources).
        not_read: Still images never read because the target was reached first.
    """

    total: int | None = None
    read: int = 0
    used: int = 0
    unusable: list[SkippedInput] = field(default_factory=list)
    quality: dict[str, int] = field(default_factory=dict)
    not_read: int = 0

    def message(self) -> str:
        """One line for people, e.g. ``"3 of 8 images could not be used (2 unreadable, 1 greyscale)"``; ``""`` if
        every input was used."""
        parts = []
        if self.unusable:
            why = collections.Counter(_short(u) for u in self.unusable)
            detail = ", ".join(f"{n} {k}" for k, n in why.most_common())
            of = f" of {self.total}" if self.total is not None else ""
            parts.append(f"{len(self.unusable)}{of} images could not be used ({detail})")
        elif self.quality:
            detail = ", ".join(f"{n} {k}" for k, n in sorted(self.quality.items(), key=lambda kv: -kv[1]))
            parts.append(f"{sum(self.quality.values())} of {self.read} frames skipped ({detail})")
        if self.not_read:
            parts.append(f"{self.not_read} images not read: the target was reached first")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``summary.json``'s ``inputs``)."""
        return {
            "total": self.total,
            "read": self.read,
            "used": self.used,
            "unusable": [u.to_dict() for u in self.unusable],
            "quality_skipped": dict(self.quality),
            "not_read": self.not_read,
            "message": self.message(),
        }


def _triage_line(t: Triage | None) -> str:
    """One line for the live view: the call so far and what it rests on."""
    if t is None:
        return ""
    ev = t.evidence
    line = (
        f"triage so far: {t.call.upper()} ({ev['evidence_cells']} blast-like in {ev['white_cells']}, p={ev['p_value']})"
    )
    if t.apl_probability is not None:
        line += f" | APL {t.apl_probability:.2f}"
    return line + (" | counting more" if t.wants_more else "")


def _short(item: SkippedInput) -> str:
    """A short kind for counting unusable inputs: ``unreadable``, or the quality reason's first words."""
    if item.reason == SkipReason.UNREADABLE:
        return "unreadable"
    return item.detail.split(":")[0].split(" (")[0] or str(item.reason)


@dataclass
class SessionResult:
    """How a counting session ended."""

    state: SessionState
    frames: int
    cells: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None
    inputs: InputLog = field(default_factory=InputLog)


class CountingSession:
    """Runs the two pipeline threads and exposes controls and a status for the display.

    Args:
        source: An opened or unopened ``FrameSource`` (iterated in the capture thread;
            its ``on_event`` is routed into the warnings).
        station: The assembled stages (``Station.from_bundle``): its backend must be *entered*.
        store: The session store.
        counter: The counter (already restored when resuming).
        finder: The capture-side stages (default: ``station.cell_finder(source)``; give one to keep a restored tracker).
        backend_name: Shown in the display (default: the station's backend name).
        precision: Shown in the display (default: the backend's precision).
        session_name: Shown in the display.
        max_frames: Stop after this many frames (None: until the source ends).
        max_fps: Read at most this many frames per second (None: as fast as possible).
        queue_frames: Bound of the classification queue (see the skip policy).
        stop_at_target: Stop when the counter reaches its target.
        crop_folder: Also write every counted cell's crop here (``--save-crops``).
        on_cell: Called (in the worker thread) with each cell after it is stored and counted.
        skip_when_busy: Apply the skip policy (True) or make capture wait for the worker (False).
            Default: skip for live sources (cameras, streams: frames keep coming and a
            frame not taken now is gone), wait for files, videos and synthetic frames
            (nothing is lost by waiting, and the count does not depend on timing).
        note: A standing remark for the display (e.g. that a demo counts drawn cells).
        on_warning: Called (from either thread) with each warning line as it happens (``--no-tui`` prints them).
        not_estimated: Classes this session does not estimate (shown as "not estimated", never as a number):
            ``hemaedge count`` passes the platelet classes unless ``--platelets``.
        platelets: Find, classify and count platelets too (default off: ``hemaedge count --platelets``; the
            bundle needs a platelet class, ``class_groups["platelets"]`` or the default grouping). A platelet
            detection is counted only when the classifier calls it a platelet class with at least the
            review confidence; otherwise it is dropped (neither stored nor counted, tallied in
            ``dropped_platelets``): it must not land in a white-cell class or in the review bucket, which
            both count towards the white-cell target, and a stained speck the classifier does not
            recognise is not evidence of a white cell missed by the segmenter.
    """

    def __init__(
        self,
        source: Any,
        station: Station,
        store: SessionStore,
        counter: DifferentialCounter,
        *,
        finder: CellFinder | None = None,
        backend_name: str | None = None,
        precision: str | None = None,
        session_name: str = "",
        max_frames: int | None = None,
        max_fps: float | None = None,
        queue_frames: int = QUEUE_FRAMES,
        stop_at_target: bool = True,
        crop_folder: CropFolder | None = None,
        on_cell: Callable[[StoredCell, str], None] | None = None,
        skip_when_busy: bool | None = None,
        note: str = "",
        on_warning: Callable[[str], None] | None = None,
        not_estimated: tuple[str, ...] = (),
        platelets: bool = False,
    ):
        self.source = source
        self.station = station
        self.finder = finder = finder if finder is not None else station.cell_finder(source)
        self.backend = station.backend
        self.bundle = station.bundle
        self.store = store
        self.counter = counter
        self.backend_name = backend_name or station.backend_name
        self.precision = precision or station.precision
        self.on_warning = on_warning
        self.not_estimated = tuple(not_estimated)
        self.session_name = session_name
        self.max_frames = max_frames
        self.max_fps = max_fps
        self.stop_at_target = stop_at_target
        self.crop_folder = crop_folder
        self.on_cell = on_cell
        self.note = note
        self.platelet_classes = station.platelet_classes
        self.triage_rules = station.triage_rules
        self._triage: Triage | None = None
        if platelets and not self.platelet_classes:
            raise ValueError("platelets asked for, but the bundle has no platelet class")
        if platelets != finder.platelets:
            finder.use_platelets(platelets)
        self.dropped_platelets = 0
        self.skip_when_busy = bool(getattr(source, "live", False)) if skip_when_busy is None else skip_when_busy
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, queue_frames))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._reset_requested = threading.Event()
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._state = SessionState.STARTING
        self._frames = 0
        self._inputs = InputLog(total=len(source) if isinstance(getattr(source, "paths", None), list) else None)
        self._skipped: collections.Counter = collections.Counter()
        self._at_edge = 0
        self._frame_times: collections.deque = collections.deque()
        self._cell_times: collections.deque = collections.deque()
        self._warnings: dict[str, float] = {}
        self._recent: collections.deque = collections.deque(maxlen=8)
        self._snapshot = counter.snapshot()
        self._started = 0.0
        self._source_done = False
        self._counted_this_run = 0
        if hasattr(source, "on_event"):
            source.on_event = self._on_source_event

    # -- controls ----------------------------------------------------------------------------------------------------
    def start(self) -> CountingSession:
        """Start the capture and classification threads."""
        self._started = time.monotonic()
        self._state = SessionState.COUNTING
        self._threads = [
            threading.Thread(target=self._guard, args=(self._capture,), name="hemaedge-capture", daemon=True),
            threading.Thread(target=self._guard, args=(self._work,), name="hemaedge-classify", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Ask both threads to finish: capture stops reading, the worker classifies what is queued."""
        if self._state in (SessionState.COUNTING, SessionState.PAUSED, SessionState.STARTING):
            self._state = SessionState.STOPPING
        self._stop.set()
        self._unpaused.set()

    def toggle_pause(self) -> bool:
        """Pause or resume reading frames; returns True when now paused."""
        if self._unpaused.is_set():
            self._unpaused.clear()
            if self._state == SessionState.COUNTING:
                self._state = SessionState.PAUSED
            return True
        self._unpaused.set()
        if self._state == SessionState.PAUSED:
            self._state = SessionState.COUNTING
        return False

    @property
    def paused(self) -> bool:
        """Whether frame reading is paused."""
        return not self._unpaused.is_set()

    def reset(self) -> None:
        """Start the count over (a new epoch in the store; known cells and keyframes forgotten)."""
        self._reset_requested.set()

    def running(self) -> bool:
        """Whether either thread is still working."""
        return any(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for both threads; returns True when they have finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.running()

    def result(self) -> SessionResult:
        """How the session ended (call after :meth:`wait`); raises the first thread error."""
        if self._error is not None:
            raise self._error
        return SessionResult(
            self._state,
            self._frames,
            self._counted_this_run,
            time.monotonic() - self._started,
            dict(self._skipped),
            None,
            self.inputs(),
        )

    def inputs(self) -> InputLog:
        """What became of the inputs so far (a copy)."""
        with self._lock:
            log = self._inputs
            unread = getattr(self.source, "unread", None)
            not_read = int(unread()) if callable(unread) and self._state == SessionState.DONE else 0
            return InputLog(log.total, log.read, log.used, list(log.unusable), dict(log.quality), not_read)

    def run(self, poll: Callable[[CountingSession], None] | None = None, interval: float = 0.1) -> SessionResult:
        """Start, wait for the end (calling ``poll`` every ``interval`` s), return the result.

        Ctrl-C stops gracefully (queued cells are classified and stored) and is re-raised.
        """
        self.start()
        try:
            while not self.wait(interval):
                if poll is not None:
                    poll(self)
        except KeyboardInterrupt:
            self.stop()
            self.wait()
            raise
        if poll is not None:
            poll(self)
        return self.result()

    # -- status --------------------------------------------------------------------------------------------------------
    def _warn(self, text: str) -> None:
        with self._lock:
            self._warnings[text] = time.monotonic()
        if self.on_warning is not None:
            self.on_warning(text)

    def _on_source_event(self, event: Any) -> None:
        if event.kind == "skipped":  # a still image that could not be read
            with self._lock:
                detail = event.message[: -len("; skipped")] if event.message.endswith("; skipped") else event.message
                self._inputs.unusable.append(SkippedInput(event.subject or detail, SkipReason.UNREADABLE, detail))
        if getattr(event, "is_warning", False):
            self._warn(f"camera: {event.message}" if getattr(self.source, "live", False) else str(event.message))

    @staticmethod
    def _rate(times: collections.deque, now: float) -> float:
        while times and now - times[0] > RATE_WINDOW_S:
            times.popleft()
        if len(times) < 2:
            return 0.0
        span = max(now - times[0], 1e-3)
        return (len(times) - 1) / span if now - times[-1] < RATE_WINDOW_S else 0.0

    def status(self, message: str = "") -> RunStatus:
        """A consistent snapshot of everything the display shows."""
        now = time.monotonic()
        with self._lock:
            warnings = tuple(w for w, t in self._warnings.items() if now - t < WARNING_HOLD_S)
            if getattr(self.source, "status", "") == "reconnecting":
                warnings += ("camera reconnecting...",)
            if getattr(self.station.segmenter, "decision", None) == "both":  # the detector check failed: say so live
                warnings += ("white cells: the detector missed this microscope's cells; both segmenters are used",)
            return RunStatus(
                snapshot=self._snapshot,
                classes=self.counter.classes,
                differential=self.counter.groups.differential,
                group_labels=dict(self.counter.groups.labels),
                state=self._state,
                session=self.session_name,
                source=str(getattr(self.source, "uri", "")),
                backend=self.backend_name,
                precision=self.precision,
                frames=self._frames,
                fps=self._rate(self._frame_times, now),
                cells_per_s=self._rate(self._cell_times, now),
                skipped=dict(self._skipped),
                inputs_unusable=len(self._inputs.unusable),
                at_edge=self._at_edge,
                warnings=warnings,
                recent=tuple(self._recent),
                review_threshold=self.counter.review_threshold,
                message=message,
                note=self.note,
                not_estimated=self.not_estimated,
                triage=_triage_line(self._triage),
                backend_reason=self.station.backend_reason or str(getattr(self.backend, "reason", "") or ""),
            )

    # -- threads -------------------------------------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            with self._lock:
                if self._error is None:
                    self._error = exc
                self._state = SessionState.FAILED
            self._stop.set()
            self._unpaused.set()
            if threading.current_thread().name == "hemaedge-capture":
                self._put_blocking(_END)

    def _put_blocking(self, item: object) -> None:
        """Put a control item, waiting while the worker is alive (never used for frames)."""
        worker = self._threads[1] if len(self._threads) > 1 else None
        while True:
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if worker is not None and not worker.is_alive():
                    return

    def _wait_for_room(self) -> None:
        """Back-pressure for sources that can wait (files, videos, synthetic): no frame is skipped."""
        while self.queue.full() and not self._stop.is_set():
            time.sleep(0.002)

    def _capture(self) -> None:
        pending: list[Keyframe] = []
        period = 1.0 / self.max_fps if self.max_fps else 0.0
        next_at = time.monotonic()
        try:
            for frame in self.source:
                if self._stop.is_set():
                    break
                if not self._unpaused.is_set():
                    self._unpaused.wait()
                    if self._stop.is_set():
                        break
                if self._reset_requested.is_set():
                    self._reset_requested.clear()
                    self.finder.tracker.reset()
                    pending = []
                    self._put_blocking(_RESET)
                if period:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_at = max(next_at + period, time.monotonic() - period)
                if not self.skip_when_busy:
                    self._wait_for_room()
                busy = self.queue.full()
                found = self.finder.find(frame, segment=not busy)
                pending += self.finder.tracker.take_new_keyframes()
                self._tally(found)
                if found.new:
                    self.queue.put_nowait(_Item(found, pending))  # we are the only producer: not full
                    pending = []
                if self.max_frames is not None and self._frames >= self.max_frames:
                    break
        finally:
            self._source_done = True
            self._put_blocking(_END)

    def _tally(self, found: Found) -> None:
        """Account for one frame: read, used or skipped (and why), cells cut by the border."""
        frame = found.frame
        with self._lock:
            self._frames += 1
            self._inputs.read += 1
            self._frame_times.append(time.monotonic())
            self._at_edge += found.at_edge
            if found.skipped:
                self._skipped[str(found.skipped)] += 1
            else:
                self._inputs.used += 1
            if found.skipped == SkipReason.QUALITY:
                key = found.reason.split(":")[0].split(" (")[0]
                self._inputs.quality[key] = self._inputs.quality.get(key, 0) + 1
                if frame.name:  # a still image: name it
                    self._inputs.unusable.append(SkippedInput(frame.name, SkipReason.QUALITY, found.reason))
        if found.skipped == SkipReason.QUALITY:
            self._warn(f"{frame.name}: {found.reason}; skipped" if frame.name else f"frame skipped: {found.reason}")

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is _END:
                break
            if item is _RESET:
                self.store.reset()
                with self._lock:
                    self.counter.reset()
                    self._snapshot = self.counter.snapshot()
                    self._recent.clear()
                    if self._state == SessionState.DONE:
                        self._state = SessionState.COUNTING
                continue
            if self.stop_at_target and self.counter.done:
                continue  # target reached: queued cells are neither stored nor counted
            found: Found = item.found
            self._record(
                found, classify_crops(self.backend, self.bundle, found.crops, self.finder.stain), item.keyframes
            )
        with self._lock:
            if self._state not in (SessionState.FAILED, SessionState.DONE):
                ended = self._source_done and not self._stop.is_set()
                self._state = SessionState.ENDED if ended else SessionState.STOPPED

    def _record(self, found: Found, predictions: list[Prediction], keyframes: list[Keyframe]) -> None:
        frame, reg = found.frame, found.registration
        now = time.time()
        cells: list[NewCell] = []
        would = self.counter.total
        for t, crop, pred in zip(found.new, found.crops, predictions):
            if self.stop_at_target and would >= self.counter.target:
                break
            review = self.counter.is_review(pred)
            if crop.detection.kind == CellKind.PLATELET and (review or pred.class_name not in self.platelet_classes):
                with self._lock:
                    self.dropped_platelets += 1  # see the class docstring: never a white cell, never review
                continue
            if review or self.counter.groups.differential[pred.class_index]:
                would += 1
            cells.append(NewCell(crop, pred, review, reg.field, t.sx, t.sy, frame.source_id, now))
        stored = self.store.add(cells, keyframes)  # durable before it is counted (StoreError stops the session)
        for cell, new in zip(stored, cells):
            bucket = self.counter.add(new.prediction.class_index, new.review)
            if self.crop_folder is not None:
                self.crop_folder.write(
                    new.crop.pixels, cell.frame_index, cell.frame_name, cell.id, None if new.review else cell.class_name
                )
            with self._lock:
                self._counted_this_run += 1
                self._cell_times.append(time.monotonic())
                self._recent.append(
                    RecentCell(cell.id, bucket, cell.confidence, cell.frame_name or str(cell.frame_index))
                )
                self._snapshot = self.counter.snapshot()
            if self.on_cell is not None:
                self.on_cell(cell, bucket)
        if stored and self.triage_rules is not None:
            self._update_triage()
        if self.stop_at_target and self.counter.done:
            with self._lock:
                self._state = SessionState.DONE
            self._stop.set()
            self._unpaused.set()

    def _update_triage(self) -> None:
        """The slide call so far; borderline evidence at the target raises the target (up to the rules' limit)."""
        c, rules = self.counter, self.triage_rules
        t = triage(c.top_counts, c.total, c.review, c.groups.groups, rules)
        extended = 0
        if self.stop_at_target and c.done and t.wants_more and c.target < rules.max_cells:
            extended = c.extend_target(rules.extend_by, rules.max_cells)
            self.store.update_settings(target=extended)
        with self._lock:
            self._triage = t
            if extended:
                self._snapshot = c.snapshot()
        if extended:
            self._warn(
                f"triage: {t.evidence['evidence_cells']} blast-like cells in {c.total} is borderline "
                f"(p={t.evidence['p_value']}): counting on to {extended} white cells"
            )


__all__ = ["CountingSession", "InputLog", "SessionResult", "restore"]
