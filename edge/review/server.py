"""The review page's server: the standard library's ``ThreadingHTTPServer``, a small JSON API, static files.

Why this stack: it runs wherever the station runs (CPython 3.8 on JetPack 5, a
Raspberry Pi) with no new dependency, no build step and no internet; the page is
plain HTML, CSS and JavaScript shipped in the package (``static/``).

Routes::

    GET  /                      the review page          GET /static/<file>   its script and styles
    GET  /api/state             cells, verified classes, differential, flags, triage, audit rows, sign-offs
                                (ETag: a client polling with If-None-Match gets 304 until something changes)
    POST /api/change            {cell, from, to, reviewer} -> 200 {change, state} | 409 {error, state} | 423 locked
    POST /api/signoff           {reviewer, seen, second} -> 200 {signoff, state} | 409 | 423
    GET  /crops/NNNNNN.png      a cell's crop            GET /api/frame/<cell>.jpg   its source frame, box drawn
    GET  /report                the report as it stands (signed or unverified); POST /api/login {pin}

A change is answered only after its row is committed (fsynced) in the session
store, so a change the page shows survives a crash or power cut of the station.

Access. Bound to 127.0.0.1 by default: only the station itself. ``--host`` opens
it to the clinic's LAN, and then every request needs the per-run PIN (or the
token URL) printed on the station's screen; a wrong PIN is answered slower and
slower. Requests that change anything must be JSON with the ``X-Hemaedge``
header and come from the page's own origin (no other web page can post here),
and on loopback the ``Host`` header must name this server (no DNS rebinding).
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from hemaedge.edge.display.report import render_html, stylesheet
from hemaedge.edge.errors import HemaedgeError
from hemaedge.edge.review.frames import FrameFinder
from hemaedge.edge.review.verified import Verified, station_name, write_verified_reports
from hemaedge.edge.store.review import (
    ReviewConflict,
    ReviewError,
    ReviewLog,
    SessionLocked,
    destinations,
    model_bucket,
)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"review.js": "text/javascript", "review.css": "text/css"}
COOKIE = "hemaedge_review"
MAX_BODY = 64 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_CROP = re.compile(r"^/crops/(\d{6,12})\.png$")
_FRAME = re.compile(r"^/api/frame/(\d{1,12})\.jpg$")


def is_loopback(host: str) -> bool:
    """Does ``host`` (as given to ``--host``) only accept connections from this machine?"""
    return host in LOOPBACK or host.startswith("127.")


class Access:
    """The per-run secret: a 6-digit PIN to type, a long token for a link, and the cookies they buy.

    Args:
        required: Ask for it at all (always when the server is open to the LAN).
        pin: Use this PIN instead of a random one (tests, or a clinic's own).
    """

    def __init__(self, required: bool, pin: str | None = None):
        self.required = required
        self.pin = pin if pin is not None else f"{secrets.randbelow(10**6):06d}"
        self.token = secrets.token_urlsafe(18)
        self._sessions: set[str] = set()
        self._failures = 0
        self._locked_until = 0.0
        self._lock = threading.Lock()

    def new_session(self) -> str:
        """A cookie value for a browser that proved it knows the PIN or token."""
        sid = secrets.token_urlsafe(24)
        with self._lock:
            self._sessions.add(sid)
        return sid

    def allowed(self, cookie_header: str | None) -> bool:
        """Does this request carry a valid session cookie (or is no secret needed)?"""
        if not self.required:
            return True
        jar = SimpleCookie()
        try:
            jar.load(cookie_header or "")
        except Exception:  # noqa: BLE001 - a malformed Cookie header is just not a valid session
            return False
        morsel = jar.get(COOKIE)
        if morsel is None:
            return False
        with self._lock:
            return any(hmac.compare_digest(morsel.value, s) for s in self._sessions)

    def check_pin(self, pin: str) -> tuple[bool, float]:
        """``(ok, seconds to wait)``: after 5 wrong PINs each further try waits longer (up to 5 minutes)."""
        with self._lock:
            now = time.monotonic()
            if now < self._locked_until:
                return False, self._locked_until - now
            ok = hmac.compare_digest(str(pin).strip(), self.pin)
            if ok:
                self._failures = 0
                return True, 0.0
            self._failures += 1
            if self._failures >= 5:
                self._locked_until = now + min(300.0, 2.0 ** (self._failures - 4))
            return False, max(0.0, self._locked_until - now)

    def check_token(self, token: str) -> bool:
        """Is ``token`` this run's link token?"""
        return hmac.compare_digest(str(token), self.token)


class ReviewApp:
    """What the handler serves: one session's review log, its frames, and the access rules."""

    def __init__(self, log: ReviewLog, access: Access, host: str, port: int = 0):
        self.log = log
        self.access = access
        self.host = host
        self.port = port
        self.frames = FrameFinder()
        self._state_lock = threading.Lock()
        self._static_cells: list[dict[str, Any]] | None = None

    # -- state -----------------------------------------------------------------------------------------------------
    def version(self) -> str:
        """Changes whenever the review state does: the ETag of /api/state."""
        return f'"{self.log.uid[:8]}-{self.log.last_change()}-{len(self.log.signoffs())}"'

    def state(self) -> dict[str, Any]:
        """Everything the page shows."""
        v = Verified(self.log)
        summary = v.summary()
        s = v.settings
        if self._static_cells is None or len(self._static_cells) != len(v.cells):
            self._static_cells = [
                {
                    "id": c.id,
                    "crop": f"/crops/{Path(c.crop).name}",
                    "model": model_bucket(c),
                    "top": c.class_name,
                    "confidence": round(c.confidence, 4),
                    "probabilities": [round(p, 4) for p in c.probabilities],
                    "frame": c.frame_name or f"frame {c.frame_index}",
                    "box": [round(x) for x in c.box],
                }
                for c in v.cells
            ]
        verified = v.classes_of
        signed = v.signed
        reasons = []
        if signed is None and v.in_review:
            reasons.append(f"{len(v.in_review)} cell(s) still in review: move each to a class first")
        return {
            "session": {
                "name": self.log.root.name,
                "uid": self.log.uid,
                "bundle": s.get("bundle_name"),
                "bundle_sha256": s.get("bundle_sha256"),
                "station": station_name(s) if signed is None else signed.station,
                "source": s.get("source"),
                "demo": bool(s.get("demo")),
            },
            "classes": v.classes,
            "destinations": destinations(v.classes),
            "cells": [{**c, "verified": verified[c["id"]]} for c in self._static_cells],
            "summary": {
                "differential": summary["differential"],
                "model_differential": summary["model_differential"],
                "triage": summary.get("triage"),
                "verification": {k: summary["verification"][k] for k in ("status", "changed_cells", "artefacts")},
            },
            "changes": [ch.to_dict() for ch in v.changes],
            "last_change": v.last_change,
            "signoffs": [so.to_dict() for so in v.signoffs],
            "locked": signed is not None,
            "can_sign": {"ok": signed is None and not reasons, "reasons": reasons},
            "version": self.version(),
        }

    # -- actions ---------------------------------------------------------------------------------------------------
    def change(self, body: Mapping[str, Any], client: str) -> dict[str, Any]:
        try:
            cell = int(body["cell"])
            to, frm, who = str(body["to"]), str(body["from"]), str(body.get("reviewer", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReviewError("a change needs cell, from, to and reviewer") from exc
        ch = self.log.change(cell, to, frm, who, client)  # committed (fsynced) before this returns
        return {"change": ch.to_dict() if ch else None}

    def sign_off(self, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            who, seen, second = str(body.get("reviewer", "")), int(body["seen"]), bool(body.get("second", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReviewError("a sign-off needs reviewer and seen (the last change the page showed)") from exc
        with self._state_lock:  # one signature at a time; the summary signed is the one computed here
            v = Verified(self.log)
            summary = v.summary()
            station = v.signed.station if v.signed is not None else station_name(v.settings)
            so = self.log.sign_off(who, seen, station, summary["differential"], second=second)
            out: dict[str, Any] = {"signoff": so.to_dict()}
            try:
                write_verified_reports(self.log)  # the signed report.html, summary.json and cells.csv
            except OSError as exc:  # the signature is on disk; the files can be written later (--write-report)
                out["warning"] = f"signed, but the reports could not be written: {exc.strerror or exc}"
        return out

    def report_html(self) -> str:
        v = Verified(self.log)
        return render_html(v.summary(), v.cells, self.log.root)


def make_handler(app: ReviewApp) -> type:
    """A request handler class bound to ``app``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "hemaedge-review"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # the station's screen shows the PIN and errors, not every request

        # -- plumbing ----------------------------------------------------------------------------------------------
        def _send(
            self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None, cache: str = ""
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache or "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            if ctype.startswith("text/html"):
                self.send_header(
                    "Content-Security-Policy",
                    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
                )
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json; charset=utf-8", headers)

        def _error(self, status: int, message: str, **extra: Any) -> None:
            self._json(status, {"error": message, **extra})

        def _host_ok(self) -> bool:
            if not is_loopback(app.host):
                return True  # open to the LAN: the PIN guards it
            host = (self.headers.get("Host") or "").strip().lower()
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            return name in LOOPBACK

        def _origin_ok(self) -> bool:
            origin = self.headers.get("Origin")
            if origin is None:
                return True
            return urlsplit(origin).netloc.lower() == (self.headers.get("Host") or "").lower()

        def _authorised(self) -> bool:
            return app.access.allowed(self.headers.get("Cookie"))

        def _body(self) -> dict[str, Any] | None:
            keep = self.close_connection
            self.close_connection = True  # until the body is read whole, the connection cannot be reused
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON")
                return None
            if self.headers.get("X-Hemaedge") != "1" or not self._origin_ok():
                self._error(HTTPStatus.FORBIDDEN, "not from the review page")
                return None
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if not 0 <= n <= MAX_BODY:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
                return None
            try:
                doc = json.loads(self.rfile.read(n) or b"{}")
            except ValueError:
                self._error(HTTPStatus.BAD_REQUEST, "the request is not valid JSON")
                return None
            self.close_connection = keep
            if not isinstance(doc, dict):
                self._error(HTTPStatus.BAD_REQUEST, "send a JSON object")
                return None
            return doc

        # -- GET ---------------------------------------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            if not self._host_ok():
                return self._error(HTTPStatus.MISDIRECTED_REQUEST, "unknown host name")
            url = urlsplit(self.path)
            path = url.path
            if path in ("/", "/index.html"):
                token = parse_qs(url.query).get("t", [""])[0]
                if app.access.required and token and app.access.check_token(token):
                    sid = app.access.new_session()
                    return self._send(
                        HTTPStatus.SEE_OTHER,
                        b"",
                        "text/plain",
                        {"Location": "/", "Set-Cookie": f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/"},
                    )
                page = (STATIC / "review.html").read_bytes()
                return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            if path.startswith("/static/"):
                name = path[len("/static/") :]
                if name == "hemaedge.css":
                    return self._send(HTTPStatus.OK, stylesheet().encode(), "text/css; charset=utf-8")
                if name in STATIC_FILES:
                    data = (STATIC / name).read_bytes()
                    return self._send(HTTPStatus.OK, data, STATIC_FILES[name] + "; charset=utf-8")
                return self._error(HTTPStatus.NOT_FOUND, "no such file")
            if path == "/favicon.ico":
                return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", cache="max-age=86400")
            if not self._authorised():
                return self._error(HTTPStatus.UNAUTHORIZED, "enter the PIN shown on the station's screen", pin=True)
            try:
                if path == "/api/state":
                    version = app.version()
                    if self.headers.get("If-None-Match") == version:
                        return self._send(HTTPStatus.NOT_MODIFIED, b"", "application/json", {"ETag": version})
                    return self._json(HTTPStatus.OK, app.state(), {"ETag": version})
                m = _CROP.match(path)
                if m:
                    try:
                        data = (app.log.root / "crops" / f"{m.group(1)}.png").read_bytes()
                    except OSError:
                        return self._error(HTTPStatus.NOT_FOUND, "no such crop")
                    return self._send(HTTPStatus.OK, data, "image/png", cache="private, max-age=86400")
                m = _FRAME.match(path)
                if m:
                    return self._frame(int(m.group(1)))
                if path in ("/report", "/report.html"):
                    return self._send(HTTPStatus.OK, app.report_html().encode(), "text/html; charset=utf-8")
            except HemaedgeError as exc:
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc).splitlines()[0])
            return self._error(HTTPStatus.NOT_FOUND, "not found")

        def _frame(self, cell_id: int) -> None:
            cells = {c.id: c for c in app.log.cells()}
            cell = cells.get(cell_id)
            if cell is None:
                return self._error(HTTPStatus.NOT_FOUND, f"cell {cell_id} is not in this session")
            jpeg, why = app.frames.jpeg(cell)
            if jpeg is None:
                return self._error(HTTPStatus.NOT_FOUND, why)
            return self._send(HTTPStatus.OK, jpeg, "image/jpeg", cache="private, max-age=86400")

        # -- POST --------------------------------------------------------------------------------------------------
        def do_POST(self) -> None:  # noqa: N802
            if not self._host_ok():
                return self._error(HTTPStatus.MISDIRECTED_REQUEST, "unknown host name")
            path = urlsplit(self.path).path
            body = self._body()
            if body is None:
                return None
            if path == "/api/login":
                ok, wait = app.access.check_pin(str(body.get("pin", "")))
                if not ok:
                    msg = "wrong PIN" + (f"; wait {wait:.0f} s before the next try" if wait > 0 else "")
                    return self._error(HTTPStatus.UNAUTHORIZED, msg, pin=True)
                sid = app.access.new_session()
                return self._json(
                    HTTPStatus.OK, {"ok": True}, {"Set-Cookie": f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/"}
                )
            if not self._authorised():
                return self._error(HTTPStatus.UNAUTHORIZED, "enter the PIN shown on the station's screen", pin=True)
            client = f"{self.client_address[0]} {str(body.get('client', ''))[:60]}".strip()
            try:
                if path == "/api/change":
                    out = app.change(body, client)
                elif path == "/api/signoff":
                    out = app.sign_off(body)
                else:
                    return self._error(HTTPStatus.NOT_FOUND, "not found")
            except SessionLocked as exc:
                return self._error(HTTPStatus.LOCKED, str(exc), state=app.state())
            except ReviewConflict as exc:
                return self._error(HTTPStatus.CONFLICT, str(exc), current=exc.current, state=app.state())
            except ReviewError as exc:
                return self._error(HTTPStatus.BAD_REQUEST, str(exc), state=app.state())
            except HemaedgeError as exc:  # the store cannot write: the change is not on disk, say so
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc).splitlines()[0], state=app.state())
            return self._json(HTTPStatus.OK, {**out, "state": app.state()})

    return Handler


class ReviewServer(ThreadingHTTPServer):
    """The HTTP server of one review (threads per request; they end with the server)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: ReviewApp, host: str, port: int):
        self.address_family = _family(host)
        super().__init__((host.strip("[]"), port), make_handler(app))
        app.port = self.server_address[1]
        self.app = app


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
