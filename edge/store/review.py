"""The review's audit trail, in the session's own database: reclassifications and sign-offs.

A cell's record grows, never changes. The model's call stays in ``cells`` (a
trigger refuses any UPDATE of it); each reclassification is a new row of
``review_changes`` (who, when, which cell, the class before and the class
after, which browser); each sign-off is a row of ``signoffs``. A cell's
*verified* class is the ``new_class`` of its latest change, or the model's
bucket (its class, or ``"review"`` when the model was unsure) when nobody
changed it; sign-off confirms the untouched ones.

Concurrency. Every change names the class its author saw (``expected``). It is
applied inside one ``BEGIN IMMEDIATE`` transaction that first reads the
cell's current verified class: when another browser (or another process)
changed the cell meanwhile, the change is refused with :class:`ReviewConflict`,
which says who changed it to what, so nothing is ever silently overwritten. A
change that asks for the class the cell already has is answered as done
without a new row (a retried request is harmless).

Durability. The connection runs WAL with ``synchronous=FULL`` (as the session
store): a change is fsynced when ``COMMIT`` returns, and only then acknowledged.

Locking. Once signed off, a session takes no more changes (:class:`SessionLocked`)
and no more cells (``SessionStore.add`` refuses them). An optional second
reviewer may co-sign; the two names must differ.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hemaedge.edge.count import REVIEW
from hemaedge.edge.errors import HemaedgeError, StoreError
from hemaedge.edge.store.session import SessionStore, StoredCell, _reason, _Transaction

ARTEFACT = "artefact"  # a destination for what is not a white cell: kept on record, never counted
FIRST, SECOND = "verified", "second"
MAX_NAME = 80

REVIEW_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_changes (
    id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    t REAL NOT NULL,
    reviewer TEXT NOT NULL,
    old_class TEXT NOT NULL,
    new_class TEXT NOT NULL,
    client TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS review_changes_cell ON review_changes (cell_id);
CREATE TABLE IF NOT EXISTS signoffs (
    id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    t REAL NOT NULL,
    reviewer TEXT NOT NULL,
    role TEXT NOT NULL,
    station TEXT NOT NULL,
    last_change INTEGER NOT NULL,
    cells INTEGER NOT NULL,
    summary TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS review_changes_append_only_u BEFORE UPDATE ON review_changes
BEGIN SELECT RAISE(ABORT, 'audit rows are never changed'); END;
CREATE TRIGGER IF NOT EXISTS review_changes_append_only_d BEFORE DELETE ON review_changes
BEGIN SELECT RAISE(ABORT, 'audit rows are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS signoffs_append_only_u BEFORE UPDATE ON signoffs
BEGIN SELECT RAISE(ABORT, 'sign-offs are never changed'); END;
CREATE TRIGGER IF NOT EXISTS signoffs_append_only_d BEFORE DELETE ON signoffs
BEGIN SELECT RAISE(ABORT, 'sign-offs are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS cells_model_call_is_kept
BEFORE UPDATE OF class_index, class_name, confidence, review, probabilities ON cells
BEGIN SELECT RAISE(ABORT, 'the model''s call is never overwritten: add a review row'); END;
"""


class ReviewError(HemaedgeError):
    """A review action that cannot be done as asked (one line for the technician)."""


class ReviewConflict(ReviewError):
    """The cell (or the session) changed since the client looked: nothing was applied."""

    def __init__(self, message: str, current: str | None = None):
        super().__init__(message)
        self.current = current


class SessionLocked(ReviewError):
    """The session is signed off: no more changes."""


@dataclass(frozen=True)
class Change:
    """One audit row: ``cell_id`` moved from ``old_class`` to ``new_class`` by ``reviewer`` at ``t``."""

    id: int
    epoch: int
    cell_id: int
    t: float
    reviewer: str
    old_class: str
    new_class: str
    client: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "cell": self.cell_id,
            "time": self.t,
            "reviewer": self.reviewer,
            "from": self.old_class,
            "to": self.new_class,
            "client": self.client,
        }


@dataclass(frozen=True)
class SignOff:
    """A reviewer's signature over the session as it stood after change ``last_change``."""

    id: int
    epoch: int
    t: float
    reviewer: str
    role: str
    station: str
    last_change: int
    cells: int
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the signed summary)."""
        return {
            "id": self.id,
            "time": self.t,
            "reviewer": self.reviewer,
            "role": self.role,
            "station": self.station,
            "last_change": self.last_change,
            "cells": self.cells,
        }


def model_bucket(cell: StoredCell) -> str:
    """Where the model put a cell: its class, or ``"review"`` when it was unsure."""
    return REVIEW if cell.review else cell.class_name


def destinations(classes: Sequence[str]) -> list[str]:
    """Where a reviewer may move a cell: every class of the bundle, back to review, or artefact."""
    return [*classes, REVIEW, ARTEFACT]


def clean_name(name: str) -> str:
    """A reviewer's name as recorded: blanks collapsed; refuses an empty or overlong one."""
    text = " ".join(str(name or "").split())
    if not text:
        raise ReviewError("enter the reviewer's name first")
    if len(text) > MAX_NAME:
        raise ReviewError(f"the reviewer's name is longer than {MAX_NAME} characters")
    return text


class ReviewLog:
    """Reclassifications and sign-offs of one session (see the module docstring).

    Safe to share between threads (one lock around the connection); several
    processes may open the same session (SQLite's write lock and the
    ``expected`` check keep them from losing each other's changes).
    """

    def __init__(self, store: SessionStore):
        self.store = store
        self.root = store.root
        self._lock = threading.RLock()
        try:
            with self._lock:
                store._conn.executescript(REVIEW_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prepare session {self.root} for review: {_reason(exc)}") from exc
        self._uid = self._ensure_uid()

    @classmethod
    def open(cls, root: Any) -> ReviewLog:
        """Open a session directory for review."""
        return cls(SessionStore.open(root))

    def close(self) -> None:
        """Close the session store."""
        with self._lock:
            self.store.close()

    def __enter__(self) -> ReviewLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch under review (the session's current one)."""
        return self.store.epoch

    @property
    def uid(self) -> str:
        """The session's permanent identifier (a UUID, made on first review; FHIR and exports use it)."""
        return self._uid

    def _write(self, what: str):
        return _Tx(self, what)

    def _ensure_uid(self) -> str:
        with self._lock:
            row = self.store._conn.execute("SELECT value FROM meta WHERE key='uid'").fetchone()
            if row is not None:
                return str(json.loads(row[0]))
            with self._write("give the session an identifier") as c:
                c.execute("INSERT OR IGNORE INTO meta VALUES ('uid', ?)", (json.dumps(str(uuid.uuid4())),))
                row = c.execute("SELECT value FROM meta WHERE key='uid'").fetchone()
            return str(json.loads(row[0]))

    def settings(self) -> dict[str, Any]:
        """The session's settings (classes, bundle, target...)."""
        with self._lock:
            return self.store.settings

    def meta(self) -> dict[str, Any]:
        """The session's meta values."""
        with self._lock:
            return self.store.meta()

    def cells(self) -> list[StoredCell]:
        """The cells under review (the current epoch), in counting order."""
        return self.store.read_cells()

    # -- reading ---------------------------------------------------------------------------------------------------
    def changes(self) -> list[Change]:
        """Every change of the epoch under review, oldest first."""
        with self._lock:
            rows = self.store._conn.execute(
                "SELECT id, epoch, cell_id, t, reviewer, old_class, new_class, client FROM review_changes"
                " WHERE epoch=? ORDER BY id",
                (self.epoch,),
            ).fetchall()
        return [Change(*r) for r in rows]

    def signoffs(self) -> list[SignOff]:
        """The sign-offs of the epoch under review (first reviewer, then an optional second)."""
        with self._lock:
            rows = self.store._conn.execute(
                "SELECT id, epoch, t, reviewer, role, station, last_change, cells, summary FROM signoffs"
                " WHERE epoch=? ORDER BY id",
                (self.epoch,),
            ).fetchall()
        return [SignOff(*r[:8], json.loads(r[8])) for r in rows]

    def last_change(self) -> int:
        """Id of the newest change (0 when none): the version a client saw."""
        with self._lock:
            row = self.store._conn.execute(
                "SELECT COALESCE(MAX(id), 0) FROM review_changes WHERE epoch=?", (self.epoch,)
            ).fetchone()
        return int(row[0])

    def verified(self, cells: Sequence[StoredCell] | None = None) -> dict[int, str]:
        """``{cell id: verified class}``: the latest change's class, else the model's bucket."""
        cells = self.cells() if cells is None else cells
        out = {c.id: model_bucket(c) for c in cells}
        for ch in self.changes():
            if ch.cell_id in out:
                out[ch.cell_id] = ch.new_class
        return out

    # -- writing ---------------------------------------------------------------------------------------------------
    def change(self, cell_id: int, new_class: str, expected: str, reviewer: str, client: str = "") -> Change | None:
        """Move a cell to ``new_class``; ``expected`` is the class its author saw.

        Returns:
            The new audit row, or None when the cell already had ``new_class`` (nothing to record).
        Raises:
            ReviewError: unknown cell or class, or no reviewer name.
            ReviewConflict: the cell is no longer ``expected`` (someone else changed it).
            SessionLocked: the session is signed off.
        """
        reviewer = clean_name(reviewer)
        classes = self.settings()["classes"]
        if new_class not in destinations(classes):
            raise ReviewError(f"{new_class!r} is not a class of this session ({', '.join(destinations(classes))})")
        with self._write(f"record the change of cell {cell_id}") as c:
            self._refuse_if_signed(c)
            row = c.execute(
                "SELECT class_name, review FROM cells WHERE id=? AND epoch=?", (int(cell_id), self.epoch)
            ).fetchone()
            if row is None:
                raise ReviewError(f"cell {cell_id} is not in this session")
            last = c.execute(
                "SELECT new_class, reviewer, t FROM review_changes WHERE cell_id=? ORDER BY id DESC LIMIT 1",
                (int(cell_id),),
            ).fetchone()
            current = last[0] if last else (REVIEW if row[1] else row[0])
            if current == new_class:
                return None
            if current != expected:
                now = f"is now {current} (changed by {last[1]} at {_clock(last[2])})" if last else f"is {current}"
                raise ReviewConflict(
                    f"cell {cell_id} {now}, not {expected} as shown: your change was not applied; look at it again",
                    current,
                )
            t = time.time()
            cur = c.execute(
                "INSERT INTO review_changes (epoch, cell_id, t, reviewer, old_class, new_class, client)"
                " VALUES (?,?,?,?,?,?,?)",
                (self.epoch, int(cell_id), t, reviewer, current, new_class, str(client)[:200]),
            )
            return Change(int(cur.lastrowid), self.epoch, int(cell_id), t, reviewer, current, new_class, client)

    def sign_off(
        self, reviewer: str, seen_change: int, station: str, summary: Mapping[str, Any], second: bool = False
    ) -> SignOff:
        """Sign the session as it stands; ``seen_change`` is the last change the reviewer saw.

        The first sign-off needs every cell out of the review bucket and locks the
        session; ``second=True`` adds the optional second reviewer's signature.

        Raises:
            ReviewConflict: cells still in review, or changes the reviewer has not seen.
            SessionLocked: already signed (by this role).
            ReviewError: no name, or the second reviewer is the first.
        """
        reviewer = clean_name(reviewer)
        with self._write("record the sign-off") as c:
            signed = c.execute(
                "SELECT reviewer, role FROM signoffs WHERE epoch=? ORDER BY id", (self.epoch,)
            ).fetchall()
            last = int(
                c.execute("SELECT COALESCE(MAX(id), 0) FROM review_changes WHERE epoch=?", (self.epoch,)).fetchone()[0]
            )
            if int(seen_change) != last:
                raise ReviewConflict(
                    f"the session changed since you looked (change {last}, you saw {seen_change}): look again, "
                    "then sign"
                )
            if second:
                if not signed:
                    raise ReviewError("the session is not signed off yet: the first reviewer signs first")
                if any(r[1] == SECOND for r in signed):
                    raise SessionLocked("a second reviewer has already signed this session")
                if signed[0][0].casefold() == reviewer.casefold():
                    raise ReviewError(f"{reviewer} signed as the first reviewer; the second must be someone else")
                role = SECOND
            else:
                if signed:
                    raise SessionLocked(f"already signed off by {signed[0][0]}")
                rows = c.execute("SELECT id, class_name, review FROM cells WHERE epoch=?", (self.epoch,)).fetchall()
                current = {r[0]: (REVIEW if r[2] else r[1]) for r in rows}
                for cid, new in c.execute(
                    "SELECT cell_id, new_class FROM review_changes WHERE epoch=? ORDER BY id", (self.epoch,)
                ):
                    current[cid] = new
                unsure = sorted(cid for cid, v in current.items() if v == REVIEW)
                if unsure:
                    raise ReviewConflict(
                        f"{len(unsure)} cell(s) are still in review (#{', #'.join(map(str, unsure[:5]))}"
                        f"{', ...' if len(unsure) > 5 else ''}): move each to a class first"
                    )
                role = FIRST
            n = int(c.execute("SELECT COUNT(*) FROM cells WHERE epoch=?", (self.epoch,)).fetchone()[0])
            t = time.time()
            cur = c.execute(
                "INSERT INTO signoffs (epoch, t, reviewer, role, station, last_change, cells, summary)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (self.epoch, t, reviewer, role, station, last, n, json.dumps(dict(summary))),
            )
            c.execute("INSERT INTO events (t, kind, detail) VALUES (?, 'signed', ?)", (t, f"{role} by {reviewer}"))
            return SignOff(int(cur.lastrowid), self.epoch, t, reviewer, role, station, last, n, dict(summary))

    def _refuse_if_signed(self, c: sqlite3.Connection) -> None:
        row = c.execute("SELECT reviewer, t FROM signoffs WHERE epoch=? ORDER BY id LIMIT 1", (self.epoch,)).fetchone()
        if row is not None:
            raise SessionLocked(f"the session was signed off by {row[0]} at {_clock(row[1])}: it takes no more changes")


class _Tx(_Transaction):
    """The session store's transaction, under the log's lock (threads of the review server share one connection)."""

    def __init__(self, log: ReviewLog, what: str):
        super().__init__(log.store, what)
        self.log = log

    def __enter__(self) -> sqlite3.Connection:
        self.log._lock.acquire()
        try:
            return super().__enter__()
        except BaseException:
            self.log._lock.release()
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self.log._lock.release()

    def _error(self, exc: BaseException) -> StoreError:
        return StoreError(f"session {self.store.root} cannot {self.what}: {_reason(exc)}; nothing of it was recorded")


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
