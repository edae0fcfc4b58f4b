"""The crash-safe session store: every classified cell is on disk before it is counted.

A session is a directory::

    SESSION/
      session.sqlite   one row per classified cell, the keyframes of the slide, events, settings
      crops/           the crop of every cell, NNNNNN.png (what the classifier saw, before resizing)
      summary.json, cells.csv, report.html   written at the end (and on a snapshot)

Durability. SQLite runs in WAL mode with ``synchronous=FULL``: every commit
fsyncs the write-ahead log, so a committed cell survives a power cut.
``NORMAL`` would be faster but, in WAL mode, may roll back the last commits
on power loss, i.e. lose cells the user has already seen counted; one fsync
per frame that has new cells (a few per second at most) is cheap. For each
batch the rows are inserted, the crop PNGs written and fsynced (in parallel,
so the file system commits them together; then the crops directory is
fsynced, so their names are durable), and only then the
transaction is committed and the cells handed on to be counted and shown.
A crash before the commit leaves at most orphan crop files, which the next
write of the same id replaces.

The review (``hemaedge review``) adds its own tables to the same database
(``review_changes``, ``signoffs``: ``hemaedge.edge.store.review``); once a session
is signed off there, :meth:`SessionStore.add` and :meth:`SessionStore.reset` refuse
to change it.

Any failure to write (disk full, read-only file system, a corrupt database)
raises ``StoreError`` with one line; the failing batch is rolled back and
was never counted, and everything committed before it stays intact.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.count.tracking import Keyframe
from hemaedge.edge.errors import StoreError
from hemaedge.edge.records import Crop, Prediction

DB_NAME = "session.sqlite"
CROPS = "crops"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    t REAL NOT NULL,
    source TEXT NOT NULL,
    frame_index INTEGER NOT NULL,
    frame_name TEXT NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL,
    field INTEGER NOT NULL, sx REAL NOT NULL, sy REAL NOT NULL,
    class_index INTEGER NOT NULL,
    class_name TEXT NOT NULL,
    confidence REAL NOT NULL,
    review INTEGER NOT NULL,
    probabilities TEXT NOT NULL,
    crop TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_epoch ON cells (epoch);
CREATE TABLE IF NOT EXISTS keyframes (
    epoch INTEGER NOT NULL,
    id INTEGER NOT NULL,
    field INTEGER NOT NULL,
    ox REAL NOT NULL, oy REAL NOT NULL,
    frame_h INTEGER NOT NULL, frame_w INTEGER NOT NULL,
    scale REAL NOT NULL,
    thumb_h INTEGER NOT NULL, thumb_w INTEGER NOT NULL,
    thumb BLOB NOT NULL,
    PRIMARY KEY (epoch, id)
);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, t REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class NewCell:
    """A classified cell to persist: the records of the stages that made it, and the counting decision.

    Attributes:
        crop: What was cut (RGB pixels as cut from the frame, the detection's box and kind, the frame).
        prediction: What the classifier said.
        review: The counting decision: True when the top probability was below the review threshold.
        field: The slide field the frame was placed in.
        sx: The cell's centre on the slide (field coordinates, pixels).
        sy: Ditto.
        source: Where the frame came from (``Frame.source_id``).
        t: When it was classified (epoch seconds).
    """

    crop: Crop
    prediction: Prediction
    review: bool
    field: int
    sx: float
    sy: float
    source: str
    t: float


@dataclass(frozen=True)
class StoredCell:
    """A cell as committed to the store (``crop`` is relative to the session directory)."""

    id: int
    epoch: int
    t: float
    source: str
    frame_index: int
    frame_name: str
    box: tuple[float, float, float, float]
    field: int
    sx: float
    sy: float
    class_index: int
    class_name: str
    confidence: float
    review: bool
    probabilities: tuple[float, ...]
    crop: str

    @property
    def size(self) -> float:
        """Cell diameter in pixels (larger box side)."""
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "time": self.t,
            "source": self.source,
            "frame": self.frame_index,
            "frame_name": self.frame_name,
            "box": [round(v, 1) for v in self.box],
            "slide": {"field": self.field, "x": round(self.sx, 1), "y": round(self.sy, 1)},
            "class": "review" if self.review else self.class_name,
            "top_class": self.class_name,
            "confidence": round(self.confidence, 4),
            "review": self.review,
            "probabilities": [round(p, 4) for p in self.probabilities],
            "crop": self.crop,
        }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 else rgb)
    if not ok:
        raise OSError("cannot encode a crop as PNG")
    return buf.tobytes()


def _fill(fd: int, rgb: np.ndarray, sync: bool = True) -> None:
    """Encode ``rgb`` as PNG into an open file, fsync when ``sync``, and close it."""
    try:
        view = memoryview(_encode_png(rgb))
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_png(path: Path, rgb: np.ndarray, sync: bool = True) -> None:
    """Write an RGB uint8 image as PNG, fsynced when ``sync``; raises OSError on failure."""
    _fill(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), rgb, sync)


class SessionStore:
    """One counting session on disk (see the module docstring).

    Use :meth:`create` for a new session, :meth:`open` to resume one. The store
    is written from one thread (the classification worker); :meth:`read_cells`
    may be called from any thread (it opens its own read connection).
    """

    def __init__(self, root: Path, conn: sqlite3.Connection):
        self.root = root
        self.crops = root / CROPS
        self._conn = conn
        self._pool: ThreadPoolExecutor | None = None
        self.epoch = int(self.meta().get("epoch", 0))

    # -- opening ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _connect(db: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(os.fspath(db), isolation_level=None, check_same_thread=False, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @classmethod
    def create(cls, root: str | os.PathLike, settings: dict[str, Any]) -> SessionStore:
        """Create a new session directory; refuses one that already holds a session."""
        root = Path(root)
        if (root / DB_NAME).exists():
            raise StoreError(f"{root} already holds a session; resume it with --resume {root} or pick another --out")
        try:
            (root / CROPS).mkdir(parents=True, exist_ok=True)
            conn = cls._connect(root / DB_NAME)
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            rows = {"schema_version": SCHEMA_VERSION, "created": time.time(), "epoch": 0, "settings": settings}
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows.items()])
            conn.execute("INSERT INTO events (t, kind, detail) VALUES (?, 'created', '')", (time.time(),))
            conn.execute("COMMIT")
            _fsync_dir(root)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot create a session in {root}: {_reason(exc)}") from exc
        return cls(root, conn)

    @classmethod
    def open(cls, root: str | os.PathLike) -> SessionStore:
        """Open an existing session for resuming (recovers the WAL after a crash)."""
        root = Path(root)
        db = root / DB_NAME
        if not db.is_file():
            raise StoreError(f"{root} is not a hemaedge session (no {DB_NAME})")
        try:
            conn = cls._connect(db)
            version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            (root / CROPS).mkdir(exist_ok=True)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open session {root}: {_reason(exc)}") from exc
        if version is None or json.loads(version[0]) > SCHEMA_VERSION:
            raise StoreError(f"session {root} was written by a newer or unknown hemaedge (schema {version})")
        return cls(root, conn)

    def close(self) -> None:
        """Checkpoint the WAL into the database and close."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._conn is None:
            return
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # a checkpoint is an optimisation; the WAL itself is durable
        self._conn.close()
        self._conn = None

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- settings and events ---------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """All meta values (``settings``, ``epoch``, ``created``, ...)."""
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the session was created with (bundle, precision, target, source...)."""
        return dict(self.meta().get("settings", {}))

    def _tx(self, what: str):
        return _Transaction(self, what)

    def update_settings(self, **changes: Any) -> None:
        """Change settings (e.g. a raised target on resume)."""
        with self._tx("update settings") as c:
            s = self.settings
            s.update(changes)
            c.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (json.dumps(s),))

    def log(self, kind: str, detail: str = "") -> None:
        """Record an event (resumed, reset, snapshot, finished...)."""
        with self._tx(f"log {kind}") as c:
            c.execute("INSERT INTO events (t, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, detail))

    def events(self) -> list[tuple[float, str, str]]:
        """All events, oldest first."""
        return list(self._conn.execute("SELECT t, kind, detail FROM events ORDER BY id"))

    def signed_off(self) -> str | None:
        """Who signed the current epoch off in the review (``hemaedge review``), else None.

        A signed-off session is locked: :meth:`add` and :meth:`reset` refuse to change it.
        """
        return _signer(self._conn, self.epoch)

    def _refuse_if_signed(self, c: sqlite3.Connection) -> None:
        who = _signer(c, self.epoch)
        if who is not None:
            raise StoreError(
                f"session {self.root} was signed off by {who} in the review and is locked: count in a new session"
            )

    def reset(self) -> int:
        """Start a new epoch: earlier cells stay on disk but no longer count. Returns the new epoch."""
        with self._tx("reset") as c:
            self._refuse_if_signed(c)
            self.epoch += 1
            c.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (json.dumps(self.epoch),))
            c.execute(
                "INSERT INTO events (t, kind, detail) VALUES (?, 'reset', ?)", (time.time(), f"epoch {self.epoch}")
            )
        return self.epoch

    # -- cells -----------------------------------------------------------------------------------------------------
    def add(self, cells: Sequence[NewCell], keyframes: Sequence[Keyframe] = ()) -> list[StoredCell]:
        """Persist a batch of cells (and keyframes) durably; returns them as stored.

        Order: insert rows, write + fsync crops, fsync the crops directory, commit.
        Raises:
            StoreError: the batch was not stored (and must not be counted).
        """
        if not cells and not keyframes:
            return []
        out: list[StoredCell] = []
        writes: list[tuple[Path, np.ndarray]] = []
        with self._tx(f"store {len(cells)} cell(s)") as c:
            self._refuse_if_signed(c)
            for kf in keyframes:
                c.execute(
                    "INSERT OR REPLACE INTO keyframes VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        self.epoch,
                        kf.id,
                        kf.field,
                        kf.ox,
                        kf.oy,
                        kf.frame_shape[0],
                        kf.frame_shape[1],
                        kf.scale,
                        kf.thumb.shape[0],
                        kf.thumb.shape[1],
                        np.ascontiguousarray(kf.thumb, np.uint8).tobytes(),
                    ),
                )
            for cell in cells:
                pred, det = cell.prediction, cell.crop.detection
                probs = [round(float(p), 6) for p in np.asarray(pred.probabilities, np.float64)]
                box = tuple(float(v) for v in det.box)
                cur = c.execute(
                    "INSERT INTO cells (epoch, t, source, frame_index, frame_name, x0, y0, x1, y1, field, sx, sy,"
                    " class_index, class_name, confidence, review, probabilities, crop)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'')",
                    (
                        self.epoch,
                        cell.t,
                        cell.source,
                        int(cell.crop.frame_index),
                        cell.crop.frame_name,
                        *box,
                        int(cell.field),
                        float(cell.sx),
                        float(cell.sy),
                        int(pred.class_index),
                        pred.class_name,
                        float(pred.confidence),
                        int(cell.review),
                        json.dumps(probs),
                    ),
                )
                cid = int(cur.lastrowid)
                rel = f"{CROPS}/{cid:06d}.png"
                c.execute("UPDATE cells SET crop=? WHERE id=?", (rel, cid))
                writes.append((self.root / rel, cell.crop.pixels))
                out.append(
                    StoredCell(
                        cid,
                        self.epoch,
                        cell.t,
                        cell.source,
                        int(cell.crop.frame_index),
                        cell.crop.frame_name,
                        box,
                        int(cell.field),
                        float(cell.sx),
                        float(cell.sy),
                        int(pred.class_index),
                        pred.class_name,
                        float(pred.confidence),
                        bool(cell.review),
                        tuple(probs),
                        rel,
                    )
                )
            if writes:
                self._write_crops(writes)
        return out

    def _write_crops(self, writes: Sequence[tuple[Path, np.ndarray]]) -> None:
        """Create the crop files, then encode, write and fsync them and fsync the folder, all in parallel.

        fsyncs issued together share the file system's journal commit: about 4 ms for a
        frame's five crops and their names here, instead of about 25 ms one after another.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hemaedge-crops")
        fds: list[int] = []
        try:
            for path, _ in writes:  # the names exist before the folder is fsynced
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        jobs = [self._pool.submit(_fill, fd, crop) for fd, (_, crop) in zip(fds, writes)]
        jobs.append(self._pool.submit(_fsync_dir, self.crops))
        for job in jobs:
            job.result()  # re-raises the first OSError (every job runs, so every fd is closed)

    def read_cells(self, epoch: int | None = None) -> list[StoredCell]:
        """Committed cells of an epoch (default: the current one), in the order they were counted."""
        epoch = self.epoch if epoch is None else epoch
        conn = sqlite3.connect(f"file:{self.root / DB_NAME}?mode=ro", uri=True, timeout=10.0)
        try:
            rows = conn.execute(
                "SELECT id, epoch, t, source, frame_index, frame_name, x0, y0, x1, y1, field, sx, sy, class_index,"
                " class_name, confidence, review, probabilities, crop FROM cells WHERE epoch=? ORDER BY id",
                (epoch,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read session {self.root}: {_reason(exc)}") from exc
        finally:
            conn.close()
        return [
            StoredCell(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                (r[6], r[7], r[8], r[9]),
                r[10],
                r[11],
                r[12],
                r[13],
                r[14],
                r[15],
                bool(r[16]),
                tuple(json.loads(r[17])),
                r[18],
            )
            for r in rows
        ]

    def read_keyframes(self, epoch: int | None = None) -> list[Keyframe]:
        """Keyframes of an epoch, for relocalising a resumed session on the slide."""
        epoch = self.epoch if epoch is None else epoch
        rows = self._conn.execute(
            "SELECT id, field, ox, oy, frame_h, frame_w, scale, thumb_h, thumb_w, thumb FROM keyframes"
            " WHERE epoch=? ORDER BY id",
            (epoch,),
        ).fetchall()
        return [
            Keyframe(
                r[0], r[1], r[2], r[3], (r[4], r[5]), r[6], np.frombuffer(r[9], np.uint8).reshape(r[7], r[8]).copy()
            )
            for r in rows
        ]

    def iter_crops(self, cells: Sequence[StoredCell]) -> Iterator[tuple[StoredCell, Path]]:
        """``(cell, absolute crop path)`` pairs."""
        for c in cells:
            yield c, self.root / c.crop


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back and turned into one StoreError line on any failure."""

    def __init__(self, store: SessionStore, what: str):
        self.store = store
        self.what = what

    def __enter__(self) -> sqlite3.Connection:
        if self.store._conn is None:
            raise StoreError(f"session store {self.store.root} is closed")
        try:
            self.store._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        return self.store._conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        conn = self.store._conn
        if exc_type is None:
            try:
                conn.execute("COMMIT")
                return False
            except sqlite3.Error as err:
                exc = err
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the failed COMMIT may already have rolled back
        if isinstance(exc, (OSError, sqlite3.Error)):
            raise self._error(exc) from exc
        return False

    def _error(self, exc: BaseException) -> StoreError:
        return StoreError(
            f"session store {self.store.root} cannot {self.what}: {_reason(exc)}; nothing of it was "
            f"counted, and every cell counted before is safe (resume with --resume {self.store.root})"
        )


def _signer(conn: sqlite3.Connection, epoch: int) -> str | None:
    """The first reviewer who signed ``epoch`` off (table ``signoffs``, made by the review), else None."""
    try:
        row = conn.execute("SELECT reviewer FROM signoffs WHERE epoch=? ORDER BY id LIMIT 1", (epoch,)).fetchone()
    except sqlite3.OperationalError:  # never reviewed: the review's tables do not exist yet
        return None
    return None if row is None else str(row[0])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
