/* hemaedge review page: plain JavaScript, no build step, no library, nothing from the internet.
 *
 * The server is the only judge: every change goes to /api/change with the class this page showed; the
 * page redraws from the state the server answers with (or a conflict, which it shows). It polls
 * /api/state every few seconds (ETag, 304 when nothing changed) to show other browsers' changes.
 */
"use strict";
(function () {
  var POLL_MS = 3000;
  var REVIEW = "review";
  var ARTEFACT = "artefact";
  var CLIENT = Math.random().toString(36).slice(2, 10);

  var S = {
    state: null,
    etag: null,
    tiles: {}, // cell id -> button
    buckets: {}, // class -> {section, grid, count}
    open: null, // cell id shown in the dialog
    undo: null,
    busy: false,
    toastTimer: null,
    built: false,
  };

  function $(sel) { return document.querySelector(sel); }

  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), attrs[k]);
      else e.setAttribute(k, attrs[k]);
    });
    (kids || []).forEach(function (c) { if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  function when(t) {
    var d = new Date(t * 1000);
    return d.toLocaleDateString() + " " + d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function reviewer() { return $("#reviewer").value.replace(/\s+/g, " ").trim(); }

  // -- talking to the station ------------------------------------------------------------------------------
  function api(path, body) {
    var opts = { credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      opts.method = "POST";
      opts.headers["Content-Type"] = "application/json";
      opts.headers["X-Hemaedge"] = "1";
      opts.body = JSON.stringify(body);
    } else if (path === "/api/state" && S.etag) {
      opts.headers["If-None-Match"] = S.etag;
    }
    return fetch(path, opts).then(function (r) {
      if (r.status === 304) return { status: 304, doc: null };
      return r.json().then(
        function (doc) { return { status: r.status, doc: doc, etag: r.headers.get("ETag") }; },
        function () { return { status: r.status, doc: { error: "the station answered HTTP " + r.status } }; }
      );
    }, function () {
      return { status: 0, doc: { error: "the station does not answer: nothing was saved; check the connection" } };
    });
  }

  function newer(a, b) { // is state a at least as new as b?
    if (!b) return true;
    if (a.last_change !== b.last_change) return a.last_change > b.last_change;
    return a.signoffs.length >= b.signoffs.length;
  }

  function refresh() {
    return api("/api/state").then(function (r) {
      if (r.status === 401) return showLogin("");
      if (r.status === 200) { S.etag = r.etag; apply(r.doc, true); }
    });
  }

  // -- state -> page ---------------------------------------------------------------------------------------
  function apply(st, fromPoll) {
    if (!newer(st, S.state)) return;
    var prev = S.state;
    S.state = st;
    S.etag = st.version;
    if (prev && fromPoll) tellOthers(prev, st);
    render();
  }

  function tellOthers(prev, st) {
    var news = st.changes.filter(function (c) {
      return c.id > prev.last_change && (c.client || "").slice(-CLIENT.length) !== CLIENT;
    });
    if (news.length === 1) {
      var c = news[0];
      toast("Cell #" + c.cell + " was moved to " + c.to + " by " + c.reviewer + " (another screen)");
      flash(c.cell);
    } else if (news.length > 1) {
      toast(news.length + " cells were changed on another screen");
      news.forEach(function (c) { flash(c.cell); });
    }
    if (st.signoffs.length > prev.signoffs.length) {
      var s = st.signoffs[st.signoffs.length - 1];
      toast("Signed off by " + s.reviewer + (s.role === "second" ? " (second review)" : "") + " on another screen");
    }
  }

  function cellById(id) {
    var cells = S.state.cells;
    for (var i = 0; i < cells.length; i++) if (cells[i].id === id) return cells[i];
    return null;
  }

  function order() { // buckets in display order: review first, the classes, artefacts last
    return [REVIEW].concat(S.state.classes, [ARTEFACT]);
  }

  function keyFor(dest) {
    var i = S.state.classes.indexOf(dest);
    if (i >= 0 && i < 9) return String(i + 1);
    if (i === 9) return "0";
    if (dest === REVIEW) return "R";
    if (dest === ARTEFACT) return "X";
    return "";
  }

  function destFor(key) {
    var k = key.length === 1 ? key.toUpperCase() : "";
    if (k === "R") return REVIEW;
    if (k === "X") return ARTEFACT;
    if (/^[0-9]$/.test(k)) {
      var i = k === "0" ? 9 : Number(k) - 1;
      return S.state.classes[i] || null;
    }
    return null;
  }

  function label(dest) { return dest === ARTEFACT ? "artefact (not a white cell)" : dest; }

  function render() {
    var st = S.state;
    $("#login").hidden = true;
    $("#main").hidden = false;
    $("#session-name").textContent = st.session.name;
    renderStatus(st);
    renderDifferential(st);
    renderSignoff(st);
    renderGallery(st);
    renderAudit(st);
    if (S.open != null && $("#cell-dialog").open) renderDialog();
  }

  function renderStatus(st) {
    var p = $("#status");
    var so = st.signoffs;
    if (so.length) {
      var t = "Signed off by " + so[0].reviewer + " at " + when(so[0].time);
      if (so.length > 1) t += "; second review by " + so[1].reviewer + " at " + when(so[1].time);
      p.className = "verified";
      p.textContent = t + ". The session is locked.";
    } else {
      var n = st.summary.verification.changed_cells.length;
      p.className = "unverified";
      p.textContent = "UNVERIFIED: not signed off. " + (n ? n + " cell" + (n === 1 ? "" : "s") + " reclassified so far." :
        "Pre-classified by the model; nobody has changed a cell yet.");
    }
    var s = st.session;
    $("#provenance").textContent = "Pre-classified by bundle " + s.bundle + " (sha256 " + String(s.bundle_sha256 || "").slice(0, 12) +
      "\u2026) on station " + s.station + " \u00b7 source " + s.source + (s.demo ? " \u00b7 demo: drawn cells, not a blood count" : "");
  }

  function renderDifferential(st) {
    var d = st.summary.differential;
    var model = {};
    st.summary.model_differential.classes.forEach(function (r) { model[r["class"]] = r.count; });
    $("#total").textContent = "(" + d.total_wbc + " white cells, target " + d.target + ")";
    var t = clear($("#diff"));
    t.appendChild(el("tr", {}, [el("th", { text: "class" }), el("th", { text: "n" }), el("th", { text: "%" }),
      el("th", { text: "95% CI" }), el("th", { text: "vs model", title: "cells gained or lost in review" })]));
    d.classes.forEach(function (r) {
      var delta = r.count - (model[r["class"]] || 0);
      var dtext = delta === 0 ? "" : (delta > 0 ? "+" : "") + delta;
      var cells = [el("td", { text: r.label || r["class"] }), el("td", { text: String(r.count) })];
      if (r.estimated === false) {
        cells.push(el("td", { colspan: "2", text: "not estimated" }));
      } else if (r.in_differential) {
        cells.push(el("td", { text: r.percent.toFixed(1) }), el("td", { text: r.ci95[0].toFixed(1) + "\u2013" + r.ci95[1].toFixed(1) }));
      } else {
        cells.push(el("td", { colspan: "2", text: r.per_100_wbc.toFixed(1) + " per 100 WBC" }));
      }
      cells.push(el("td", { cls: "diffd", text: dtext }));
      t.appendChild(el("tr", { cls: r["class"] === REVIEW ? "review" : (r.in_differential ? "" : "other") }, cells));
    });
    $("#diff-note").textContent = "Recounted from the verified classes with the station's counting code; artefacts are not counted. " +
      (d.complete ? "" : "Target not reached: intervals are wide.");
    var tri = clear($("#triage"));
    if (st.summary.triage != null) {
      var tv = st.summary.triage;
      var text = typeof tv === "object" ? [(tv.call || tv.triage || tv.label || "").toUpperCase(), tv.rule || tv.reason || tv.note || ""].filter(Boolean).join("; ") : String(tv);
      tri.appendChild(el("h3", { text: "Triage" }));
      tri.appendChild(el("p", { cls: "triage", text: text }));
    }
    var fl = clear($("#flags"));
    if (!d.flags.length) fl.appendChild(el("li", { cls: "none", text: "No flags." }));
    d.flags.forEach(function (f) { fl.appendChild(el("li", { cls: f.indexOf("BLAST") === 0 ? "flag-blast" : "", text: f })); });
  }

  function renderSignoff(st) {
    var box = clear($("#signoff"));
    var so = st.signoffs;
    if (!so.length) {
      var reasons = st.can_sign.reasons;
      box.appendChild(el("p", { id: "sign-why", cls: reasons.length ? "warn" : "meta",
        text: reasons.length ? reasons.join("; ") + "." :
          "Every cell has a class. Signing records your name and the time and locks the session; cells nobody changed keep the model's class." }));
      var btn = el("button", { type: "button", id: "sign-btn", cls: "primary", text: "Sign off\u2026" });
      btn.disabled = !st.can_sign.ok;
      btn.addEventListener("click", function () { confirmSign(false); });
      box.appendChild(el("div", { cls: "signbox", id: "sign-confirm" }, [btn]));
    } else {
      box.appendChild(el("p", { cls: "verified", text: "Verified by " + so[0].reviewer + " at " + when(so[0].time) +
        " on " + so[0].station + " (" + so[0].cells + " cells)." }));
      if (so.length > 1) {
        box.appendChild(el("p", { cls: "verified", text: "Second review by " + so[1].reviewer + " at " + when(so[1].time) + "." }));
      } else {
        box.appendChild(el("p", { cls: "meta", text: "Optional: a second reviewer checks the session and co-signs with their own name." }));
        var b2 = el("button", { type: "button", id: "cosign-btn", text: "Co-sign as second reviewer\u2026" });
        b2.addEventListener("click", function () { confirmSign(true); });
        box.appendChild(el("div", { cls: "signbox", id: "sign-confirm" }, [b2]));
      }
      box.appendChild(el("p", {}, [el("a", { href: "/report", target: "_blank", rel: "noopener", id: "signed-report", text: "Open the signed report" })]));
    }
  }

  function confirmSign(second) {
    var who = reviewer();
    if (!who) { toast("Enter your name first (top of the page)", true); $("#reviewer").focus(); return; }
    var box = clear($("#sign-confirm"));
    var n = S.state.cells.length;
    box.appendChild(el("span", { text: (second ? "Co-sign " : "Sign off ") + n + " cells as " + who + "?" }));
    var yes = el("button", { type: "button", id: "sign-yes", cls: "primary", text: second ? "Confirm co-signature" : "Confirm sign-off" });
    var no = el("button", { type: "button", text: "Cancel" });
    yes.addEventListener("click", function () { signOff(second); });
    no.addEventListener("click", function () { renderSignoff(S.state); });
    box.appendChild(yes);
    box.appendChild(no);
    yes.focus();
  }

  function signOff(second) {
    if (S.busy) return;
    S.busy = true;
    api("/api/signoff", { reviewer: reviewer(), seen: S.state.last_change, second: second, client: CLIENT }).then(function (r) {
      S.busy = false;
      if (r.doc && r.doc.state) apply(r.doc.state);
      if (r.status === 200) toast(second ? "Co-signed. The report names both reviewers." : "Signed off. The session is locked; the signed report is written.");
      else toast(r.doc.error, true);
    });
  }

  // -- gallery ---------------------------------------------------------------------------------------------
  function buildGallery(st) {
    var g = clear($("#gallery"));
    S.buckets = {};
    order().forEach(function (dest) {
      var count = el("span", { cls: "meta" });
      var grid = el("div", { cls: "grid" });
      var empty = el("p", { cls: "empty", text: dest === REVIEW ? "No cell left in review." : "" });
      var sec = el("section", { cls: "bucket " + (dest === REVIEW ? "review" : dest === ARTEFACT ? "artefact" : ""), "data-bucket": dest },
        [el("h3", {}, [document.createTextNode(label(dest) + " "), count]), empty, grid]);
      g.appendChild(sec);
      S.buckets[dest] = { section: sec, grid: grid, count: count, empty: empty };
    });
    var keys = clear($("#key-list"));
    order().forEach(function (dest) {
      var k = keyFor(dest);
      if (k) keys.appendChild(el("span", {}, [el("kbd", { text: k }), document.createTextNode(" " + label(dest))]));
    });
    S.built = true;
  }

  function tile(c) {
    var b = S.tiles[c.id];
    if (!b) {
      b = el("button", { type: "button", cls: "tile", "data-id": String(c.id) },
        [el("img", { src: c.crop, alt: "", loading: "lazy", width: "96", height: "96" }), el("span", { cls: "cap" })]);
      b.addEventListener("click", function () { openCell(c.id); });
      S.tiles[c.id] = b;
    }
    var changed = c.verified !== c.model;
    b.classList.toggle("changed", changed);
    b.querySelector(".cap").textContent = "#" + c.id + (changed ? " was " + c.model : " " + c.confidence.toFixed(2));
    b.setAttribute("aria-label", "cell " + c.id + ": " + c.verified + (changed ? ", was " + c.model : "") +
      "; model " + c.top + " " + c.confidence.toFixed(2));
    b.dataset.cls = c.verified;
    return b;
  }

  function renderGallery(st) {
    if (!S.built) buildGallery(st);
    var active = document.activeElement;
    var by = {};
    order().forEach(function (d) { by[d] = []; });
    st.cells.forEach(function (c) { (by[c.verified] || (by[c.verified] = [])).push(c); });
    Object.keys(by).forEach(function (dest) {
      var bk = S.buckets[dest];
      if (!bk) return;
      var list = by[dest];
      bk.count.textContent = "(" + list.length + ")";
      bk.section.hidden = list.length === 0 && dest !== REVIEW;
      bk.empty.hidden = list.length !== 0;
      var want = list.map(tile);
      var have = bk.grid.children;
      var same = have.length === want.length && want.every(function (b, i) { return have[i] === b; });
      if (!same) want.forEach(function (b) { bk.grid.appendChild(b); });
    });
    if (active && active.classList && active.classList.contains("tile") && document.activeElement !== active) active.focus();
  }

  function flash(id) {
    var b = S.tiles[id];
    if (!b) return;
    b.classList.remove("flash");
    void b.offsetWidth;
    b.classList.add("flash");
  }

  function bucketList(dest) {
    return S.state.cells.filter(function (c) { return c.verified === dest; }).map(function (c) { return c.id; });
  }

  function neighbour(id, dest) { // the cell after id in its bucket (else the one before), to carry on with
    var ids = bucketList(dest);
    var i = ids.indexOf(id);
    if (i < 0) return null;
    if (i + 1 < ids.length) return ids[i + 1];
    return i > 0 ? ids[i - 1] : null;
  }

  function focusTile(id) {
    var b = S.tiles[id];
    if (b) b.focus();
  }

  function moveFocus(from, key) {
    var all = Array.prototype.slice.call(document.querySelectorAll("#gallery .bucket:not([hidden]) .tile"));
    var i = all.indexOf(from);
    if (i < 0) return;
    if (key === "ArrowRight") return all[Math.min(all.length - 1, i + 1)].focus();
    if (key === "ArrowLeft") return all[Math.max(0, i - 1)].focus();
    var r = from.getBoundingClientRect();
    var best = null, bestScore = Infinity;
    all.forEach(function (b) {
      if (b === from) return;
      var q = b.getBoundingClientRect();
      var dy = q.top - r.top;
      if ((key === "ArrowDown" && dy <= 4) || (key === "ArrowUp" && dy >= -4)) return;
      var score = Math.abs(dy) * 1000 + Math.abs(q.left - r.left);
      if (score < bestScore) { bestScore = score; best = b; }
    });
    if (best) best.focus();
  }

  // -- changing a cell -------------------------------------------------------------------------------------
  function move(id, to, via) {
    var st = S.state;
    var c = cellById(id);
    if (!c || S.busy) return;
    if (st.locked) { toast("The session is signed off: it takes no more changes", true); return; }
    var who = reviewer();
    if (!who) { toast("Enter your name first (top of the page)", true); $("#reviewer").focus(); return; }
    if (c.verified === to) return;
    var from = c.verified;
    var next = neighbour(id, from);
    S.busy = true;
    api("/api/change", { cell: id, from: from, to: to, reviewer: who, client: CLIENT }).then(function (r) {
      S.busy = false;
      if (r.status === 200) {
        apply(r.doc.state);
        S.undo = { cell: id, from: to, to: from };
        toast("Cell #" + id + ": " + from + " \u2192 " + to, false, true);
        if (via === "dialog") {
          if (next != null && cellById(next).verified === from) openCell(next);
          else closeDialog();
        } else if (via === "tile") {
          focusTile(next != null ? next : id);
        }
      } else {
        if (r.doc && r.doc.state) apply(r.doc.state);
        toast(r.doc.error || "The change was not saved", true);
        if (via === "tile") focusTile(id);
      }
    });
  }

  function undo() {
    var u = S.undo;
    S.undo = null;
    $("#toast-undo").hidden = true;
    if (!u) return;
    var c = cellById(u.cell);
    if (!c || c.verified !== u.from) { toast("Cell #" + u.cell + " has changed since; nothing undone", true); return; }
    move(u.cell, u.to, "undo");
  }

  // -- the cell, large -------------------------------------------------------------------------------------
  function openCell(id) {
    S.open = id;
    var d = $("#cell-dialog");
    renderDialog();
    if (!d.open) d.showModal();
    var cur = d.querySelector(".moves button[aria-pressed='true']");
    var first = d.querySelector(".moves button:not([disabled])");
    (first || cur || $("#dlg-close")).focus();
  }

  function closeDialog() {
    var d = $("#cell-dialog");
    var id = S.open;
    if (d.open) d.close();
    S.open = null;
    if (id != null) focusTile(id);
  }

  function renderDialog() {
    var st = S.state;
    var c = cellById(S.open);
    if (!c) return closeDialog();
    var changed = c.verified !== c.model;
    $("#cell-title").textContent = "Cell #" + c.id + ": " + label(c.verified);
    var img = $("#dlg-img");
    if (img.getAttribute("src") !== c.crop) img.setAttribute("src", c.crop);
    img.alt = "cell " + c.id;
    $("#dlg-meta").textContent = "Model: " + c.top + " " + c.confidence.toFixed(2) + (c.model === REVIEW ? " (unsure: review)" : "") +
      (changed ? "; now " + c.verified : "") + ". " + c.frame + ", box " + c.box.join(", ") + ".";
    var probs = clear($("#dlg-probs"));
    var ranked = st.classes.map(function (k, i) { return [k, c.probabilities[i]]; })
      .sort(function (a, b) { return b[1] - a[1]; });
    var shown = ranked.filter(function (kv, i) { return i < 2 || kv[1] >= 0.01; });
    shown.forEach(function (kv) {
      probs.appendChild(el("li", {}, [document.createTextNode(kv[0] + " " + kv[1].toFixed(2)),
        el("span", { cls: "pbar", style: "width:" + Math.round(kv[1] * 120) + "px" })]));
    });
    if (shown.length < ranked.length) {
      probs.appendChild(el("li", { cls: "rest", text: (ranked.length - shown.length) + " other classes below 0.01" }));
    }
    var moves = clear($("#dlg-moves"));
    order().forEach(function (dest) {
      var k = keyFor(dest);
      var b = el("button", { type: "button", "data-to": dest }, [k ? el("kbd", { text: k }) : null, document.createTextNode(" " + label(dest))]);
      var here = dest === c.verified;
      b.setAttribute("aria-pressed", here ? "true" : "false");
      b.disabled = here || st.locked;
      b.addEventListener("click", function () { move(c.id, dest, "dialog"); });
      moves.appendChild(b);
    });
    var ids = st.cells.filter(function (x) { return x.verified === c.verified; }).map(function (x) { return x.id; });
    var i = ids.indexOf(c.id);
    $("#dlg-prev").disabled = i <= 0;
    $("#dlg-next").disabled = i < 0 || i >= ids.length - 1;
    var fimg = $("#dlg-frame-img");
    var fsrc = "/api/frame/" + c.id + ".jpg";
    if (fimg.getAttribute("src") !== fsrc) {
      fimg.hidden = true;
      $("#dlg-frame-msg").textContent = "Loading the source frame\u2026";
      fimg.setAttribute("src", fsrc);
    }
    fimg.alt = "source frame of cell " + c.id;
  }

  function step(delta) {
    var c = cellById(S.open);
    if (!c) return;
    var ids = S.state.cells.filter(function (x) { return x.verified === c.verified; }).map(function (x) { return x.id; });
    var i = ids.indexOf(c.id) + delta;
    if (i >= 0 && i < ids.length) openCell(ids[i]);
  }

  // -- messages --------------------------------------------------------------------------------------------
  function toast(text, error, withUndo) {
    var t = $("#toast");
    $("#toast-text").textContent = text;
    t.className = error ? "error" : "";
    t.setAttribute("role", error ? "alert" : "status");
    $("#toast-undo").hidden = !withUndo;
    t.hidden = false;
    clearTimeout(S.toastTimer);
    S.toastTimer = setTimeout(function () { t.hidden = true; }, error ? 10000 : 6000);
  }

  function renderAudit(st) {
    $("#audit-count").textContent = "(" + st.changes.length + " change" + (st.changes.length === 1 ? "" : "s") + ")";
    var t = clear($("#audit"));
    t.appendChild(el("tr", {}, [el("th", { text: "#" }), el("th", { cls: "l", text: "when" }), el("th", { cls: "l", text: "who" }),
      el("th", { text: "cell" }), el("th", { cls: "l", text: "from \u2192 to" })]));
    st.changes.slice().reverse().forEach(function (c) {
      t.appendChild(el("tr", {}, [el("td", { text: String(c.id) }), el("td", { cls: "l", text: when(c.time) }),
        el("td", { cls: "l", text: c.reviewer }), el("td", { text: "#" + c.cell }), el("td", { cls: "l", text: c.from + " \u2192 " + c.to })]));
    });
  }

  function showLogin(msg) {
    $("#main").hidden = true;
    $("#login").hidden = false;
    $("#status").textContent = "Locked: enter the PIN.";
    $("#login-msg").textContent = msg || "";
    $("#pin").focus();
  }

  // -- wiring ----------------------------------------------------------------------------------------------
  function init() {
    var name = $("#reviewer");
    try { name.value = localStorage.getItem("hemaedge.reviewer") || ""; } catch (e) { /* private mode */ }
    name.addEventListener("input", function () {
      try { localStorage.setItem("hemaedge.reviewer", reviewer()); } catch (e) { /* private mode */ }
    });
    $("#login").addEventListener("submit", function (ev) {
      ev.preventDefault();
      api("/api/login", { pin: $("#pin").value }).then(function (r) {
        if (r.status === 200) { $("#pin").value = ""; refresh(); } else showLogin(r.doc.error);
      });
    });
    $("#dlg-close").addEventListener("click", closeDialog);
    $("#dlg-prev").addEventListener("click", function () { step(-1); });
    $("#dlg-next").addEventListener("click", function () { step(1); });
    $("#cell-dialog").addEventListener("close", function () { var id = S.open; S.open = null; if (id != null) focusTile(id); });
    $("#toast-undo").addEventListener("click", undo);
    var fimg = $("#dlg-frame-img");
    fimg.addEventListener("load", function () { fimg.hidden = false; $("#dlg-frame-msg").textContent = "Source frame, the cell boxed."; });
    fimg.addEventListener("error", function () {
      fimg.hidden = true;
      fetch(fimg.getAttribute("src"), { credentials: "same-origin" }).then(function (r) { return r.json(); })
        .then(function (d) { $("#dlg-frame-msg").textContent = d.error || "No source frame."; },
          function () { $("#dlg-frame-msg").textContent = "No source frame."; });
    });
    document.addEventListener("keydown", function (ev) {
      if (!S.state || ev.altKey || ev.ctrlKey || ev.metaKey) return;
      var target = ev.target;
      if (target && target.matches && target.matches("input, textarea, select")) return;
      var dlg = $("#cell-dialog").open;
      var tileEl = !dlg && target && target.closest ? target.closest(".tile") : null;
      var id = dlg ? S.open : (tileEl ? Number(tileEl.dataset.id) : null);
      if (id == null) return;
      var dest = destFor(ev.key);
      if (dest) { ev.preventDefault(); move(id, dest, dlg ? "dialog" : "tile"); return; }
      if (dlg && (ev.key === "ArrowRight" || ev.key === "ArrowLeft") && !(target && target.closest && target.closest(".moves"))) {
        ev.preventDefault(); step(ev.key === "ArrowRight" ? 1 : -1); return;
      }
      if (!dlg && /^Arrow/.test(ev.key)) { ev.preventDefault(); moveFocus(tileEl, ev.key); }
    });
    refresh();
    setInterval(function () { if (!document.hidden && !S.busy) refresh(); }, POLL_MS);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
