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

Platelets: when the bundle has a platelet class, the segmenter is asked for
platelets too; they are tracked, cut (as large as a white cell's crop, see
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

import numpy as np
from hemaedge.edge.bundle import Bundle, preprocess
from hemaedge.edge.count import DifferentialCounter, SlideTracker
from hemaedge.edge.count.tracking import Keyframe
from hemaedge.edge.display.status import RecentCell, RunStatus
from hemaedge.edge.station import CellFinder, Found, platelet_classes
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
    tracker.reset()
    for c in cells:
        counter.add(c.class_index, c.review)
        tracker.cells.add(c.field, c.sx, c.sy, c.box[2] - c.box[0], c.box[3] - c.box[1])
    tracker.registrar.load(store.read_keyframes())
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
class SessionResult:
    """How a counting session ended."""

    state: str
    frames: int
    cells: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None


class CountingSession:
    """Runs the two pipeline threads and exposes controls and a status for the display.

    Args:
        source: An opened or unopened ``FrameSource`` (iterated in the capture thread;
            its ``on_event`` is routed into the warnings).
        finder: The capture-side stages.
        backend: An *entered* backend (``classify(batch) -> N x K`` probabilities).
        bundle: The bundle (input spec, classes).
        store: The session store.
        counter: The counter (already restored when resuming).
        backend_name: Shown in the display (default: ``backend.name``).
        precision: Shown in the display (default: ``backend.precision``).
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
        platelets: Find, classify and count platelets too. Default: when the bundle has a platelet class
            (``class_groups["platelets"]``, else the default grouping of its class names). A platelet
            detection is counted only when the classifier calls it a platelet class with at least the
            review confidence; otherwise it is dropped (neither stored nor counted, tallied in
            ``dropped_platelets``): it must not land in a white-cell class or in the review bucket, which
            both count towards the white-cell target, and a stained speck the classifier does not
            recognise is not evidence of a white cell missed by the segmenter.
    """

    def __init__(
        self,
        source: Any,
        finder: CellFinder,
        backend: Any,
        bundle: Bundle,
        store: SessionStore,
        counter: DifferentialCounter,
        *,
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
        platelets: bool | None = None,
    ):
        self.source = source
        self.finder = finder
        self.backend = backend
        self.bundle = bundle
        self.store = store
        self.counter = counter
        self.backend_name = backend_name or str(getattr(backend, "name", type(backend).__name__))
        self.precision = precision or str(getattr(backend, "precision", ""))
        self.session_name = session_name
        self.max_frames = max_frames
        self.max_fps = max_fps
        self.stop_at_target = stop_at_target
        self.crop_folder = crop_folder
        self.on_cell = on_cell
        self.note = note
        self.platelet_classes = platelet_classes(bundle)
        if platelets is None:
            platelets = bool(self.platelet_classes)
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
        self._state = "starting"
        self._frames = 0
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
        self._state = "counting"
        self._threads = [
            threading.Thread(target=self._guard, args=(self._capture,), name="hemaedge-capture", daemon=True),
            threading.Thread(target=self._guard, args=(self._work,), name="hemaedge-classify", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Ask both threads to finish: capture stops reading, the worker classifies what is queued."""
        if self._state in ("counting", "paused", "starting"):
            self._state = "stopping"
        self._stop.set()
        self._unpaused.set()

    def toggle_pause(self) -> bool:
        """Pause or resume reading frames; returns True when now paused."""
        if self._unpaused.is_set():
            self._unpaused.clear()
            if self._state == "counting":
                self._state = "paused"
            return True
        self._unpaused.set()
        if self._state == "paused":
            self._state = "counting"
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
        )

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

    def _on_source_event(self, event: Any) -> None:
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
                at_edge=self._at_edge,
                warnings=warnings,
                recent=tuple(self._recent),
                review_threshold=self.counter.review_threshold,
                message=message,
                note=self.note,
                backend_reason=str(getattr(self.backend, "reason", "") or ""),
            )

    # -- threads -------------------------------------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            with self._lock:
                if self._error is None:
                    self._error = exc
                self._state = "failed"
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
                pending += self.finder.tracker.registrar.take_pending()
                with self._lock:
                    self._frames += 1
                    self._frame_times.append(time.monotonic())
                    self._at_edge += found.at_edge
                    if found.skipped:
                        self._skipped[found.skipped] += 1
                if found.skipped == "quality":
                    self._warn(f"frame skipped: {found.reason}")
                if found.new:
                    self.queue.put_nowait(_Item(found, pending))  # we are the only producer: not full
                    pending = []
                if self.max_frames is not None and self._frames >= self.max_frames:
                    break
        finally:
            self._source_done = True
            self._put_blocking(_END)

    def _work(self) -> None:
        spec = self.bundle.manifest.input
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
                    if self._state == "done":
                        self._state = "counting"
                continue
            if self.stop_at_target and self.counter.done:
                continue  # target reached: queued cells are neither stored nor counted
            found: Found = item.found
            batch = preprocess([c.pixels for c in found.crops], spec, "RGB")
            probs = self.backend.classify(batch)
            self._record(found, probs, item.keyframes)
        with self._lock:
            if self._state not in ("failed", "done"):
                self._state = "ended" if self._source_done and not self._stop.is_set() else "stopped"

    def _record(self, found: Found, probs: np.ndarray, keyframes: list[Keyframe]) -> None:
        frame, reg = found.frame, found.registration
        now = time.time()
        cells, decisions = [], []
        would = self.counter.total
        for t, crop, p in zip(found.new, found.crops, probs):
            if self.stop_at_target and would >= self.counter.target:
                break
            idx, name, conf, review = self.counter.decide(p)
            if crop.detection.kind == "platelet" and (review or name not in self.platelet_classes):
                with self._lock:
                    self.dropped_platelets += 1  # see the class docstring: never a white cell, never review
                continue
            if review or self.counter.groups.differential[idx]:
                would += 1
            decisions.append((idx, review))
            cells.append(
                NewCell(
                    now,
                    frame.source_id,
                    frame.index,
                    frame.name,
                    t.box,
                    reg.field,
                    t.sx,
                    t.sy,
                    idx,
                    name,
                    conf,
                    review,
                    p,
                    crop.pixels,
                )
            )
        stored = self.store.add(cells, keyframes)  # durable before it is counted (StoreError stops the session)
        for cell, new, (idx, review) in zip(stored, cells, decisions):
            bucket = self.counter.add(idx, review)
            if self.crop_folder is not None:
                self.crop_folder.write(
                    new.crop, cell.frame_index, cell.frame_name, cell.id, None if review else cell.class_name
                )
            with self._lock:
                self._counted_this_run += 1
                self._cell_times.append(time.monotonic())
                self._recent.append(
                    RecentCell(cell.id, bucket, cell.confidence, cell.frame_name or str(cell.frame_index))
                )
                self._snapshot = self.counter.snapshot()
                if self.stop_at_target and self.counter.done:
                    self._state = "done"
            if self.on_cell is not None:
                self.on_cell(cell, bucket)
        if self.stop_at_target and self.counter.done:
            self._stop.set()
            self._unpaused.set()


__all__ = ["CountingSession", "SessionResult", "restore"]
