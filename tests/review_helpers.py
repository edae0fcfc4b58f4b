"""Sessions, review servers and a small FHIR server for the review tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from helpers import BLOODMNIST_CLASSES, new_cell
from hemaedge.edge.display.report import write_reports
from hemaedge.edge.sources import open_source
from hemaedge.edge.store import SessionStore

ROOT = Path(__file__).resolve().parents[1]
# the model's calls of a made session: mostly white cells, a few non-white ones, and two the model was unsure of
CALLS = (
    "neutrophil neutrophil lymphocyte neutrophil monocyte neutrophil eosinophil lymphocyte neutrophil "
    "neutrophil lymphocyte neutrophil basophil neutrophil lymphocyte platelet neutrophil monocyte "
    "neutrophil lymphocyte neutrophil erythroblast neutrophil lymphocyte"
).split()
UNSURE = (4, 11)  # 1-based cell ids the model put in review


def make_session(root: Path, calls=CALLS, unsure=UNSURE, classes=BLOODMNIST_CLASSES, target: int = 20) -> Path:
    """A finished session as ``hemaedge count`` leaves it: store, crops of drawn cells, summary/cells/report."""
    src = open_source("synthetic://?seed=5&frames=400&wbc=4&pan=6")
    crops = []
    i = 0
    while len(crops) < len(calls):
        f = src.frame(i)
        i += 1
        for box, kind in zip(f.truth, f.truth_kinds):
            if kind != "wbc" or len(crops) >= len(calls):
                continue
            x0, y0, x1, y1 = (int(v) for v in box)
            if x0 < 4 or y0 < 4 or x1 > f.pixels.shape[1] - 4 or y1 > f.pixels.shape[0] - 4:
                continue
            crops.append((f, np.ascontiguousarray(f.rgb()[y0 - 4 : y1 + 4, x0 - 4 : x1 + 4]), (x0, y0, x1, y1)))
    store = SessionStore.create(
        root,
        {
            "bundle": "/bundles/test",
            "bundle_name": "test-bundle",
            "bundle_sha256": "ab" * 32,
            "precision": "int8",
            "backend": "onnxruntime/CPU",
            "classes": list(classes),
            "class_groups": {},
            "target": target,
            "review_threshold": 0.6,
            "source": "synthetic://?seed=5&frames=400&wbc=4&pan=6",
            "demo": False,
        },
    )
    cells = []
    for n, (name, (f, crop, box)) in enumerate(zip(calls, crops), start=1):
        k = list(classes).index(name)
        p = np.full(len(classes), 0.02, np.float32)
        p[k] = 0.5 if n in unsure else 0.9
        p[(k + 1) % len(classes)] += 1.0 - p.sum()
        cells.append(new_cell(f.index, f.name, box, 0, 0.0, 0.0, p, classes, crop, review=n in unsure, source=src.uri))
    store.add(cells)
    write_reports(store, info={"backend": "onnxruntime/CPU", "frames": i, "state": "finished"})
    store.close()
    return root


class ThreadServer:
    """A review server on a free loopback port, serving from a thread of this process."""

    def __init__(self, session: Path, pin: str | None = None, host: str = "127.0.0.1"):
        from hemaedge.edge.review.server import Access, ReviewApp, ReviewServer, is_loopback
        from hemaedge.edge.store.review import ReviewLog

        self.log = ReviewLog.open(session)
        self.access = Access(required=pin is not None or not is_loopback(host), pin=pin)
        self.app = ReviewApp(self.log, self.access, host)
        self.server = ReviewServer(self.app, host, 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        self.log.close()


def request(url: str, body: Any = None, headers: dict[str, str] | None = None, method: str | None = None):
    """``(status, json or text, headers)`` of one HTTP request (errors are answers, not exceptions)."""
    import urllib.error
    import urllib.request

    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
        hdrs.setdefault("X-Hemaedge", "1")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    try:
        with opener.open(req, timeout=30) as r:
            status, raw, h = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        status, raw, h = exc.code, exc.read(), dict(exc.headers)
    try:
        return status, json.loads(raw or b"null"), h
    except ValueError:
        return status, raw.decode("utf-8", "replace"), h


RUNNER = "import sys; from hemaedge.cli import main; raise SystemExit(main(sys.argv[1:]))"


@contextlib.contextmanager
def review_process(session: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``hemaedge review SESSION --port 0`` in a child process; yields ``(process, base URL)``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, "review", str(session), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://[^\s]+?)/?$", line.strip())
        assert m, f"no URL from hemaedge review: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield proc, m.group(1).rstrip("/")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


class FhirServer:
    """A small FHIR server on loopback: transaction Bundles with conditional create (``ifNoneExist``).

    ``drop_answers``: how many transactions to process and then answer by closing the connection (a lost reply).
    ``status``: answer every request with this HTTP status instead (e.g. 400).
    """

    def __init__(self, port: int = 0, drop_answers: int = 0, status: int | None = None):
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests = 0
        self.drop_answers = drop_answers
        self.status = status
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    if outer.status is not None:
                        return self._answer(outer.status, {"resourceType": "OperationOutcome", "issue": []})
                    doc = outer.transaction(body)
                    if outer.drop_answers > 0:
                        outer.drop_answers -= 1
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return None
                self._answer(200, doc)

            def _answer(self, status: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """Apply a transaction: each POST entry is created unless its ``ifNoneExist`` identifier matches."""
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
        out = []
        for e in bundle["entry"]:
            req = e["request"]
            kind = req["url"]
            system, value = req["ifNoneExist"].split("=", 1)[1].split("|", 1)
            store = self.resources.setdefault(kind, {})
            if value in store:
                out.append({"response": {"status": "200 OK", "location": f"{kind}/{store[value]['id']}"}})
                continue
            res = dict(e["resource"], id=str(sum(len(v) for v in self.resources.values()) + 1))
            assert any(i["value"] == value for i in (res["identifier"] if isinstance(res["identifier"], list) else []))
            store[value] = res
            out.append({"response": {"status": "201 Created", "location": f"{kind}/{res['id']}"}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}

    def count(self, kind: str) -> int:
        with self.lock:
            return len(self.resources.get(kind, {}))

    def __enter__(self) -> FhirServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``cond()`` until it is truthy (generous: the test machine is slow and shared)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def env_without_proxy() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env
