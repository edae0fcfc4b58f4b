"""``hemaedge fhir SESSION``: the session's results as a FHIR R4 Bundle; ``--post`` sends it, store-and-forward.

Examples::

    hemaedge fhir sessions/20261126-101500                      # writes SESSION/fhir-bundle.json
    hemaedge fhir SESSION --wbc 7.2 --subject Patient/123       # absolute counts from the analyser's WBC
    hemaedge fhir SESSION --post https://lis.example/fhir       # queue it, send it (retries with back-off)
    hemaedge fhir --flush                                        # send what is still queued (after a restart)

Unsigned sessions are refused unless ``--preliminary``. ``--post`` first writes
the Bundle into the station's queue (``--queue``, default ``$HEMAEDGE_FHIR_QUEUE``
or ``~/.local/state/hemaedge/fhir-outbox``), then posts it; when the server
cannot be reached within ``--wait`` seconds the command exits 75 and the Bundle
stays queued for the next ``hemaedge fhir --flush`` (or the next ``--post``).
The server creates each resource once however often it is sent (conditional create).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hemaedge.edge.errors import HemaedgeError, UsageError

EX_TEMPFAIL = 75  # sysexits: try again later (the Bundle is queued)
OUT_NAME = "fhir-bundle.json"


class NotDelivered(HemaedgeError):
    """The Bundle is queued but the server refused it for good."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge fhir``."""
    parser.add_argument("session", nargs="?", help="the session folder (or its name under sessions/)")
    parser.add_argument("--out", help=f"where to write the Bundle (default SESSION/{OUT_NAME}; - for stdout)")
    parser.add_argument(
        "--wbc", type=float, help="white-cell count in 10^9/L (from the analyser): adds absolute counts"
    )
    parser.add_argument("--subject", help="reference to the patient, e.g. Patient/123")
    parser.add_argument("--preliminary", action="store_true", help="allow an unsigned session (status preliminary)")
    parser.add_argument("--post", metavar="URL", help="FHIR base URL to send the Bundle to (a transaction)")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra HTTP header for --post (e.g. 'Authorization: Bearer ...'); kept in the queue entry (mode 600)",
    )
    parser.add_argument("--flush", action="store_true", help="send what is queued (no SESSION needed)")
    parser.add_argument("--queue", help="the store-and-forward queue folder (default: the station's)")
    parser.add_argument(
        "--wait", type=float, default=120.0, help="seconds to keep retrying before leaving it queued (default 120)"
    )
    parser.add_argument(
        "--retry-base", type=float, default=2.0, help="first retry delay in seconds (doubles, default 2)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def _check(args: argparse.Namespace) -> None:
    if not args.session and not args.flush:
        raise UsageError("name a SESSION, or --flush to send what is queued")
    if args.flush and (args.wbc is not None or args.subject or args.preliminary or args.out) and not args.session:
        raise UsageError(
            "--flush sends queued Bundles as they are; --wbc, --subject, --preliminary and --out need a SESSION"
        )
    if args.header and not args.post:
        raise UsageError("--header only applies with --post")
    for h in args.header:
        if ":" not in h or not h.split(":", 1)[0].strip():
            raise UsageError(f"--header {h!r}: give NAME:VALUE")
    if args.wait < 0 or args.retry_base <= 0 or args.timeout <= 0:
        raise UsageError("--wait must be >= 0, --retry-base and --timeout > 0")


def run(args: argparse.Namespace) -> int:
    """Run ``hemaedge fhir``."""
    from hemaedge.edge.review.export_cells import resolve_session
    from hemaedge.edge.review.fhir import build_bundle, write_bundle
    from hemaedge.edge.review.outbox import FAILED, PENDING, SENT, Outbox, default_queue
    from hemaedge.edge.review.verified import Verified
    from hemaedge.edge.store.review import ReviewLog

    _check(args)
    say = None if args.json else print
    report: dict = {}
    key = None
    box = None
    if args.post or args.flush:
        box = Outbox(args.queue or default_queue(), base=args.retry_base, timeout=args.timeout)
    if args.session:
        root = resolve_session(args.session)
        with ReviewLog.open(root) as log:
            v = Verified(log)
            bundle = build_bundle(v, wbc=args.wbc, preliminary=args.preliminary, subject=args.subject)
            uid = log.uid
        status = next(
            e["resource"]["status"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
        )
        if args.out == "-":
            print(json.dumps(bundle, indent=1))
            say = None
        else:
            path = write_bundle(bundle, Path(args.out) if args.out else root / OUT_NAME)
            report["bundle"] = str(path)
            if say:
                say(f"FHIR R4 Bundle ({status}, {len(bundle['entry'])} resources): {path}")
        if args.post:
            headers = dict((h.split(":", 1)[0].strip(), h.split(":", 1)[1].strip()) for h in args.header)
            entry = box.enqueue(bundle, args.post, uid, status, headers)
            key = entry["key"]
            if entry["state"] == SENT:
                report["delivery"] = SENT
                if say:
                    say(f"already delivered to {args.post} at {entry.get('delivered_at')}: nothing to send")
                return _finish(args, report, 0)
            if say:
                say(f"queued in {box.root} ({key}); sending to {args.post}")
    if box is None:
        return _finish(args, report, 0)
    done = box.flush(wait=args.wait, only={key} if key and not args.flush else None, say=say)
    report["delivered"] = [e["key"] for e in done[SENT]]
    report["failed"] = [{"key": e["key"], "error": e["last_error"]} for e in done[FAILED]]
    report["pending"] = [
        {"key": e["key"], "error": e.get("last_error"), "next_at": e.get("next_at")} for e in done[PENDING]
    ]
    if done[FAILED]:
        _finish(args, report, None)
        e = done[FAILED][0]
        raise NotDelivered(f"{e['url']} refused the Bundle ({e['last_error']}); it is kept in {box.root}/failed")
    if done[PENDING]:
        if say:
            say(
                f"not delivered yet: {len(done[PENDING])} Bundle(s) stay queued in {box.root}; run hemaedge fhir --flush later"
            )
        return _finish(args, report, EX_TEMPFAIL)
    if say and args.flush and not done[SENT]:
        say(f"nothing queued in {box.root}")
    return _finish(args, report, 0)


def _finish(args: argparse.Namespace, report: dict, code: int | None) -> int:
    if args.json:
        print(json.dumps(report, indent=1))
    return code if code is not None else 0
