"""The review page as a person uses it, in a real headless Chromium (Debian's, driven by Playwright).

Skipped, with the reason, where Chromium or Playwright is missing (``.ci/run`` installs both). Waits are on
conditions with generous timeouts, never fixed sleeps: the test machine is slow and shared.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import BLOODMNIST_CLASSES
from hemaedge.edge.count import DifferentialCounter
from review_helpers import CALLS, ThreadServer, make_session

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HEMAEDGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
WAIT_MS = 30_000
PHONE = {"viewport": {"width": 400, "height": 860}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2}
DESK = {"viewport": {"width": 1280, "height": 900}}


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium chromium-driver (or set HEMAEDGE_CHROMIUM)")
    sync_api.expect.set_options(timeout=WAIT_MS)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=120_000)
        yield b
        b.close()


@pytest.fixture()
def expect():
    from playwright.sync_api import expect

    return expect


def open_page(browser, url, reviewer=None, errors=None, **ctx):
    context = browser.new_context(**ctx)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    if errors is not None:
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector(".tile")
    if reviewer:
        page.fill("#reviewer", reviewer)
    return page


def in_bucket(page, cell, bucket):
    return page.locator(f".bucket[data-bucket='{bucket}'] .tile[data-id='{cell}']")


def no_sideways_scroll(page):
    width = page.evaluate("document.documentElement.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    assert width <= inner, f"the page scrolls sideways: {width} px wide in a {inner} px window"


def test_three_changes_one_by_keyboard_sign_off_reload(browser, expect, tmp_path):
    """The bar: reclassify three cells (click, keyboard, tap on a phone), sign off, reload: all of it shows."""
    root = make_session(tmp_path / "s")
    errors: list[str] = []
    with ThreadServer(root) as srv:
        page = open_page(browser, srv.url + "/", "Ann Tech", errors, **DESK)
        expect(page.locator("#sign-btn")).to_be_disabled()
        expect(page.locator("#sign-why")).to_contain_text("2 cell(s) still in review")
        # 1. click: open cell 4 (the model was unsure) large and move it to neutrophil
        page.click(".tile[data-id='4']")
        expect(page.locator("#cell-dialog")).to_be_visible()
        expect(page.locator("#dlg-probs li").first).to_contain_text("neutrophil 0.50")
        expect(page.locator("#dlg-frame-img")).to_be_visible()  # the source frame, the cell boxed
        page.click("#dlg-moves button[data-to='neutrophil']")
        expect(in_bucket(page, 4, "neutrophil")).to_have_count(1)
        expect(page.locator("#cell-title")).to_contain_text("Cell #11")  # on to the next unsure one
        page.keyboard.press("Escape")
        # 2. keyboard: focus cell 11 in the gallery and press 5 (lymphocyte)
        page.focus(".tile[data-id='11']")
        page.keyboard.press("5")
        expect(in_bucket(page, 11, "lymphocyte")).to_have_count(1)
        expect(page.locator("#toast-text")).to_contain_text("Cell #11: review \u2192 lymphocyte")
        # 3. tap, on a phone: cell 1, neutrophil -> monocyte
        phone = open_page(browser, srv.url + "/", "Ann Tech", errors, **PHONE)
        no_sideways_scroll(phone)
        phone.tap(".tile[data-id='1']")
        expect(phone.locator("#cell-dialog")).to_be_visible()
        no_sideways_scroll(phone)
        phone.tap("#dlg-moves button[data-to='monocyte']")
        expect(in_bucket(phone, 1, "monocyte")).to_have_count(1)
        no_sideways_scroll(phone)
        # the desktop shows the phone's change without a reload, and says so
        expect(in_bucket(page, 1, "monocyte")).to_have_count(1)
        expect(page.locator("#toast-text")).to_contain_text("moved to monocyte by Ann Tech")
        # sign off at the desk
        expect(page.locator("#sign-btn")).to_be_enabled()
        page.click("#sign-btn")
        page.click("#sign-yes")
        expect(page.locator("#status")).to_contain_text("Signed off by Ann Tech")
        page.reload()
        page.wait_for_selector(".tile")
        # the differential, recounted from exactly those three changes
        verified = list(CALLS)
        verified[0], verified[10] = "monocyte", "lymphocyte"  # cell 4 stays a neutrophil, now confirmed
        counter = DifferentialCounter(BLOODMNIST_CLASSES, 20)
        for c in verified:
            counter.add(BLOODMNIST_CLASSES.index(c), False)
        snap = counter.snapshot()
        rows = page.locator("#diff tr").all_inner_texts()[1:]
        shown = {r.split("\t")[0]: int(r.split("\t")[1]) for r in rows}
        from hemaedge.edge.bundle.vocabulary import display_name

        assert shown == {**{display_name(c): n for c, n in snap.counts.items()}, "review": 0}  # people read labels
        mono = next(r for r in rows if r.startswith("Monocyte")).split("\t")
        lo, hi = snap.intervals["monocyte"]
        shown_lo, shown_hi = (float(x) for x in mono[3].split("\u2013"))
        assert float(mono[2]) == pytest.approx(snap.percentages["monocyte"], abs=0.051)
        assert (shown_lo, shown_hi) == (pytest.approx(lo, abs=0.051), pytest.approx(hi, abs=0.051))
        assert mono[4] == "+1"  # against the model's call
        # the audit rows: exactly three, newest first
        page.click("#audit-section summary")
        audit = page.locator("#audit tr").all_inner_texts()[1:]
        assert [r.split("\t")[3:] for r in audit] == [
            ["#1", "neutrophil \u2192 monocyte"],
            ["#11", "review \u2192 lymphocyte"],
            ["#4", "review \u2192 neutrophil"],
        ]
        assert all(r.split("\t")[2] == "Ann Tech" for r in audit)
        # the signed report says so, on the page's link and in the session folder
        html = (root / "report.html").read_text()
        for text in ("verified by <b>Ann Tech</b>", "Cells changed in review (3)", "#1</td><td class=l>neutrophil"):
            assert text in html
        report = page.context.new_page()
        report.goto(srv.url + "/report")
        expect(report.locator(".verified")).to_contain_text("Pre-classified by bundle test-bundle")
        expect(report.locator(".verified")).to_contain_text("verified by Ann Tech")
        # signed: the page refuses more changes, and nothing reaches the audit trail
        page.focus(".tile[data-id='2']")
        page.keyboard.press("6")
        expect(page.locator("#toast-text")).to_contain_text("signed off")
        assert len(srv.log.changes()) == 3
        # a second reviewer co-signs from the phone
        phone.reload()
        phone.wait_for_selector(".tile")
        phone.fill("#reviewer", "Bo Second")
        phone.tap("#cosign-btn")
        phone.tap("#sign-yes")
        expect(phone.locator("#status")).to_contain_text("second review by Bo Second")
        no_sideways_scroll(phone)
    assert errors == []


def test_two_browsers_never_lose_each_others_changes(browser, expect, tmp_path):
    root = make_session(tmp_path / "s")
    with ThreadServer(root) as srv:
        a = open_page(browser, srv.url + "/", "Ann", **DESK)
        b_ctx = browser.new_context(**DESK)
        b_ctx.set_default_timeout(WAIT_MS)
        b = b_ctx.new_page()
        b.clock.install()  # B's page does not poll on its own: it is stale until it acts
        b.goto(srv.url + "/")
        b.wait_for_selector(".tile")
        b.fill("#reviewer", "Bo")
        a.focus(".tile[data-id='3']")
        a.keyboard.press("2")  # lymphocyte -> eosinophil
        expect(in_bucket(a, 3, "eosinophil")).to_have_count(1)
        expect(in_bucket(b, 3, "lymphocyte")).to_have_count(1)  # B has not seen it
        b.focus(".tile[data-id='3']")
        b.keyboard.press("1")  # Bo, still seeing lymphocyte, asks for basophil: refused, and shown why
        expect(b.locator("#toast")).to_have_class("error")
        expect(b.locator("#toast-text")).to_contain_text("cell 3 is now eosinophil (changed by Ann")
        expect(in_bucket(b, 3, "eosinophil")).to_have_count(1)  # B's page now shows Ann's change
        b.focus(".tile[data-id='5']")
        b.keyboard.press("1")  # a different cell: fine
        expect(in_bucket(b, 5, "basophil")).to_have_count(1)
        expect(in_bucket(a, 5, "basophil")).to_have_count(1)  # A sees Bo's change when it polls
        assert [(c.cell_id, c.new_class, c.reviewer) for c in srv.log.changes()] == [
            (3, "eosinophil", "Ann"),
            (5, "basophil", "Bo"),
        ]


def test_a_pin_is_asked_when_the_review_is_open_to_the_network(browser, expect, tmp_path):
    root = make_session(tmp_path / "s")
    with ThreadServer(root, pin="246810") as srv:
        context = browser.new_context(**PHONE)
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        page.goto(srv.url + "/")
        expect(page.locator("#login")).to_be_visible()
        page.fill("#pin", "111111")
        page.click("#login button")
        expect(page.locator("#login-msg")).to_contain_text("wrong PIN")
        page.fill("#pin", "246810")
        page.click("#login button")
        page.wait_for_selector(".tile")
        no_sideways_scroll(page)


def test_the_static_report_on_a_phone_enlarges_cells_and_prints(browser, expect, tmp_path):
    root = make_session(tmp_path / "s")
    context = browser.new_context(**PHONE)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto((root / "report.html").as_uri())
    expect(page.locator(".unverified")).to_contain_text("UNVERIFIED")
    no_sideways_scroll(page)
    first = page.locator("figure").first
    small = first.locator("img").bounding_box()["width"]
    expect(first.locator(".details")).to_be_hidden()
    first.locator("img").tap()  # no hover on a phone: a tap enlarges it and shows the probabilities
    expect(first.locator(".details")).to_be_visible()
    expect(first.locator(".details")).to_contain_text("frame synthetic-")
    assert first.locator("img").bounding_box()["width"] > 2 * small
    no_sideways_scroll(page)
    pdf = page.pdf(format="A4")  # the print stylesheet: what "save as PDF" gives
    assert pdf[:4] == b"%PDF" and len(pdf) > 10_000


def test_sigkill_of_the_server_right_after_a_change_is_shown_loses_nothing(browser, expect, tmp_path):
    """The bar: the page shows a reclassification, the server is killed at once, restarted: the change is there."""
    import signal

    from review_helpers import review_process

    root = make_session(tmp_path / "s")
    with review_process(root) as (proc, url):
        page = open_page(browser, url + "/", "Ann Tech", **DESK)
        page.focus(".tile[data-id='3']")
        page.keyboard.press("6")  # lymphocyte -> monocyte
        expect(in_bucket(page, 3, "monocyte")).to_have_count(1)  # shown ...
        os.kill(proc.pid, signal.SIGKILL)  # ... and the station loses power
        proc.wait(30)
        page.context.close()
    with review_process(root) as (_, url):
        page = open_page(browser, url + "/", **DESK)
        expect(in_bucket(page, 3, "monocyte")).to_have_count(1)
        expect(page.locator("#audit-count")).to_have_text("(1 change)")
