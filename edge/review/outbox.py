"""Store-and-forward of FHIR Bundles: an on-disk queue that survives restarts and power cuts, posted with back-off.

Layout (one queue per station by default; ``--queue`` picks another)::

    QUEUE/pending/<key>.json   to send: {url, headers, bundle, attempts, next_at, last_error, ...}
    QUEUE/sent/<key>.json      delivered: the same, with delivered_at and the server's answer
    QUEUE/failed/<key>.json    refused for good by the server (a 4xx other than 408/429), with its answer

``<key>`` is the session's UUID and a digest of the target URL, so queueing the
same session for the same server again replaces the pending entry instead of
adding a second. Every entry is written to a temporary file, fsynced, renamed
into place and its folder fsynced before anything is sent, and moved to
``sent/`` the same way after the server's 2xx: a power cut at any point leaves
the entry either still pending (sent again later) or delivered. Sending twice is
harmless: every resource in the Bundle is a conditional create on its
identifier, so the server creates it once.

Retries: connection errors, timeouts, 408, 429 and 5xx are retried after
``base * 2**(attempts-1)`` seconds (capped, with +-20 % jitter); the time of the
next try is stored in the entry, so a restart keeps the back-off.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hemaedge.edge.errors import StoreError, UsageError
from hemaedge.edge.store.session import _fsync_dir

PENDING, SENT, FAILED = "pending", "sent", "failed"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
QUEUE_ENV = "HEMAEDGE_FHIR_QUEUE"


def default_queue() -> Path:
    """``$HEMAEDGE_FHIR_QUEUE``, else ``$XDG_STATE_HOME/hemaedge/fhir-outbox`` (``~/.local/state/...``)."""
    if os.environ.get(QUEUE_ENV):
        return Path(os.environ[QUEUE_ENV]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "hemaedge" / "fhir-outbox"


def _write_durably(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold an Authorization header
    try:
        data = memoryview((json.dumps(doc, indent=1) + "\n").encode("utf-8"))
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Attempt:
    """What one try to post gave."""

    ok: bool
    retry: bool
    status: int | None
    detail: str


def post_bundle(url: str, bundle: Mapping[str, Any], headers: Mapping[str, str], timeout: float) -> Attempt:
    """POST a transaction Bundle to a FHIR base URL (stdlib ``urllib``)."""
    body = json.dumps(bundle).encode("utf-8")
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/fhir+json; charset=utf-8")
    req.add_header("Accept", "application/fhir+json")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the user's server
            text = resp.read(65536).decode("utf-8", "replace")
            return Attempt(True, False, resp.status, _answer(text))
    except urllib.error.HTTPError as exc:
        text = exc.read(65536).decode("utf-8", "replace") if exc.fp is not None else ""
        return Attempt(False, exc.code in RETRY_STATUS, exc.code, f"HTTP {exc.code}: {_answer(text) or exc.reason}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Attempt(False, True, None, f"cannot reach {url}: {reason}")


def _answer(text: str) -> str:
    """A short line from the server's answer (a transaction-response's statuses, an OperationOutcome's text)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip().splitlines()[0][:200] if text.strip() else ""
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        statuses = [str(e.get("response", {}).get("status", "")) for e in doc.get("entry", [])]
        return "transaction-response: " + ", ".join(s for s in statuses if s)
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        issues = doc.get("issue") or [{}]
        return str(issues[0].get("diagnostics") or issues[0].get("details", {}).get("text") or "OperationOutcome")
    return ""


class Outbox:
    """The queue folder (see the module docstring).

    Args:
        root: The queue folder (created).
        base: First retry delay in seconds; doubles per attempt.
        cap: Longest delay between tries.
        timeout: Seconds to wait for the server's answer.
        poster: How to post (tests replace it); default :func:`post_bundle`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        base: float = 2.0,
        cap: float = 300.0,
        timeout: float = 30.0,
        poster: Callable[[str, Mapping[str, Any], Mapping[str, str], float], Attempt] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.root = Path(root)
        self.base, self.cap, self.timeout = float(base), float(cap), float(timeout)
        self.poster = poster or post_bundle
        self.clock = clock
        try:
            for sub in (PENDING, SENT, FAILED):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use {self.root} as the FHIR queue: {exc.strerror or exc}") from exc

    @staticmethod
    def key(session_uid: str, url: str, status: str) -> str:
        """Entry name: one per (session, report status, server)."""
        return f"{session_uid}-{status}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"

    def entries(self, where: str = PENDING) -> list[dict[str, Any]]:
        """The entries in ``pending``, ``sent`` or ``failed``, oldest first."""
        out = []
        for p in sorted((self.root / where).glob("*.json")):
            try:
                out.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # a torn temporary write is never renamed into place; skip anything unreadable
        return sorted(out, key=lambda e: e.get("created", 0.0))

    def enqueue(
        self,
        bundle: Mapping[str, Any],
        url: str,
        session_uid: str,
        status: str,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Queue ``bundle`` for ``url`` durably (replacing a pending entry of the same session and server).

        Returns the entry; ``entry["state"]`` is ``"sent"`` when this very bundle was delivered before (nothing queued).
        """
        if not url.lower().startswith(("http://", "https://")):
            raise UsageError(f"--post needs an http:// or https:// FHIR base URL, not {url!r}")
        key = self.key(session_uid, url, status)
        digest = hashlib.sha256(json.dumps(bundle, sort_keys=True).encode()).hexdigest()
        sent = self.root / SENT / f"{key}.json"
        if sent.exists():
            try:
                done = json.loads(sent.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                done = {}
            if done.get("digest") == digest:
                return {**done, "state": SENT}
        path = self.root / PENDING / f"{key}.json"
        now = self.clock()
        entry = {
            "key": key,
            "session": session_uid,
            "status": status,
            "url": url,
            "headers": dict(headers or {}),
            "created": now,
            "attempts": 0,
            "next_at": now,
            "last_error": None,
            "digest": digest,
            "bundle": bundle,
        }
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                entry.update(created=old.get("created", now), attempts=old.get("attempts", 0))
            except (OSError, ValueError):
                pass
        try:
            _write_durably(path, entry)
        except OSError as exc:
            raise StoreError(f"cannot write the FHIR queue entry {path}: {exc.strerror or exc}") from exc
        return {**entry, "state": PENDING}

    def _delay(self, attempts: int) -> float:
        return min(self.cap, self.base * 2.0 ** max(0, attempts - 1)) * random.uniform(0.8, 1.2)

    def try_one(self, entry: dict[str, Any]) -> str:
        """Post one pending entry now; returns its new state (``sent``, ``pending`` or ``failed``)."""
        path = self.root / PENDING / f"{entry['key']}.json"
        res = self.poster(entry["url"], entry["bundle"], entry.get("headers") or {}, self.timeout)
        now = self.clock()
        entry["attempts"] = int(entry.get("attempts", 0)) + 1
        entry["last_try"] = now
        if res.ok:
            entry.update(delivered_at=now, response_status=res.status, response=res.detail, last_error=None)
            _write_durably(self.root / SENT / path.name, entry)
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return SENT
        entry["last_error"] = res.detail
        if not res.retry:
            entry.update(failed_at=now, response_status=res.status)
            _write_durably(self.root / FAILED / path.name, entry)
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return FAILED
        entry["next_at"] = now + self._delay(entry["attempts"])
        _write_durably(path, entry)
        return PENDING

    def flush(
        self,
        wait: float = 0.0,
        only: set[str] | None = None,
        say: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, list[dict[str, Any]]]:
        """Send what is due; keep retrying for up to ``wait`` seconds while something is pending.

        Args:
            wait: How long to keep trying (0: one pass over what is due now).
            only: Entry keys to wait for (default: all pending).
            say: Called with a line per try (progress for people).

        Returns:
            ``{"sent": [...], "pending": [...], "failed": [...]}`` (entries touched or still pending).
        """
        deadline = self.clock() + max(0.0, wait)
        done: dict[str, list[dict[str, Any]]] = {SENT: [], PENDING: [], FAILED: []}
        while True:
            pending = [e for e in self.entries(PENDING) if only is None or e["key"] in only]
            now = self.clock()
            due = [e for e in pending if float(e.get("next_at", 0.0)) <= now]
            for e in due:
                try:
                    state = self.try_one(e)
                except OSError as exc:
                    raise StoreError(f"cannot update the FHIR queue {self.root}: {exc.strerror or exc}") from exc
                if say is not None:
                    what = {
                        SENT: f"delivered to {e['url']} ({e.get('response') or e.get('response_status')})",
                        FAILED: f"refused by {e['url']}: {e['last_error']}",
                        PENDING: f"not delivered ({e['last_error']}); next try in "
                        f"{max(0.0, e['next_at'] - self.clock()):.1f} s",
                    }[state]
                    say(f"{e['key']}: try {e['attempts']}: {what}")
                if state != PENDING:
                    done[state].append(e)
            left = [e for e in self.entries(PENDING) if only is None or e["key"] in only]
            if not left:
                break
            next_at = min(float(e.get("next_at", 0.0)) for e in left)
            if next_at > deadline:
                done[PENDING] = left
                break
            sleep(max(0.0, min(next_at, deadline) - self.clock()))
        return done
