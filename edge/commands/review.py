"""``hemaedge review SESSION``: the technician's review page for a finished session.

Examples::

    hemaedge review sessions/20261126-101500             # http://127.0.0.1:8765/ on the station itself
    hemaedge review 20261126-101500 --host 0.0.0.0       # open to the clinic's LAN: PIN printed here
    hemaedge review SESSION --write-report               # (re)write report.html, summary.json, cells.csv

The page shows the gallery by class (review bucket first); a technician opens a
cell large and moves it to another class by click, tap or keyboard; the
differential, flags and triage follow. Sign-off records the name and time and
locks the session; a second reviewer may co-sign. Every change is a row in the
session store, committed before the page shows it.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from typing import Any

from hemaedge.edge.errors import UsageError

DEFAULT_PORT = 8765


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge review``."""
    parser.add_argument("session", help="the session folder (or its name under sessions/)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this station only; 0.0.0.0 opens it to the LAN, PIN required)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--pin", help="use this PIN instead of a random one (also asks for it on 127.0.0.1)")
    parser.add_argument(
        "--write-report",
        action="store_true",
        help="write report.html, summary.json and cells.csv from the review as it stands, and exit",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``hemaedge review``."""
    from hemaedge.edge.review.export_cells import resolve_session
    from hemaedge.edge.review.server import Access, ReviewApp, ReviewServer, is_loopback
    from hemaedge.edge.review.verified import Verified, write_verified_reports
    from hemaedge.edge.store.review import ReviewLog
    from rich.console import Console

    if args.pin is not None and not (args.pin.isdigit() and 4 <= len(args.pin) <= 12):
        raise UsageError("--pin must be 4 to 12 digits")
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must lie in 0..65535")
    root = resolve_session(args.session)
    log = ReviewLog.open(root)
    console = Console(stderr=True)
    try:
        if args.write_report:
            paths = write_verified_reports(log)
            v = Verified(log)
            print(f"{v.status()}: {paths['report']}")
            return 0
        lan = not is_loopback(args.host)
        access = Access(required=lan or args.pin is not None, pin=args.pin)
        app = ReviewApp(log, access, args.host)
        try:
            server = ReviewServer(app, args.host, args.port)
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
        port = server.server_address[1]
        urls = _urls(args.host, port)
        print(f"review: {urls[0]}", flush=True)
        for u in urls[1:]:
            print(f"        {u}", flush=True)
        if access.required:
            console.print(f"[bold]PIN {access.pin}[/]  (or open {urls[0]}?t={access.token})")
        console.print(f"[dim]session {root} | Ctrl-C stops the server; every change is already on disk[/]")
        _serve(server)
        console.print("review server stopped")
        return 0
    finally:
        log.close()


def _urls(host: str, port: int) -> list[str]:
    if host in ("0.0.0.0", "::", "[::]"):
        names = [socket.gethostname()]
        try:
            names += sorted(
                {
                    a[4][0]
                    for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
                    if not a[4][0].startswith("127.")
                }
            )
        except OSError:
            pass
        return [f"http://{n}:{port}/" for n in names]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return [f"http://{shown}:{port}/"]


def _serve(server: Any) -> None:
    """Serve until Ctrl-C or SIGTERM (systemd stop)."""
    stop = threading.Event()

    def _term(signum: int, frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term) if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
