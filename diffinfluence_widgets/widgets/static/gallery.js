// Influence gallery: proponents and opponents of the current query, one page at a time.
// Thumbnails arrive as binary buffers (DataView) in `proponent_thumbs` / `opponent_thumbs`; never base64.
// Keyboard: arrows move between tiles (roving tabindex), Enter/Space opens the larger view and selects,
// Escape closes it, PageDown/PageUp (or n/p) change page, Home/End jump to the first/last tile.

function el(tag, cls, attrs = {}) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  return (x >= 0 ? "+" : "−") + (a !== 0 && (a < 1e-2 || a >= 1e4) ? a.toExponential(2) : a.toPrecision(3));
}

function blobUrl(dv) {
  return URL.createObjectURL(new Blob([dv], { type: "image/png" }));
}

function render({ model, el: root, signal }) {
  root.classList.add("dinf-gallery");
  root.setAttribute("role", "region");
  root.setAttribute("aria-label", "Influence gallery: training images that most influence the query");

  const head = el("div", "dinf-gallery-head");
  const caption = el("div", "dinf-caption");
  const state = el("span", "dinf-busy", { "aria-live": "polite" });
  // exact ✓ / approximate (est. recall …): is the list the method's exact top-k yet?
  const badge = el("span", "dinf-badge", { "aria-live": "polite", "aria-label": "answer status" });
  head.append(caption, badge, state);
  const sign = el("p", "dinf-sign");
  const readout = el("p", "dinf-readout", { "aria-live": "polite" });
  const error = el("div", "dinf-error", { role: "alert" });

  // the query, large, beside its proponents and opponents
  const query = el("figure", "dinf-query-panel", { "aria-label": "The query" });
  const queryImg = el("img", "dinf-query-img", { alt: "query image", draggable: "false" });
  const queryText = el("figcaption", "dinf-query-text");
  query.append(queryImg, queryText);
  let queryUrl = null;

  const sections = {};
  const body = el("div", "dinf-gallery-body");
  for (const role of ["proponent", "opponent"]) {
    const sec = el("section", `dinf-section dinf-${role}s`);
    const h = el("h4", "dinf-section-title");
    const grid = el("div", "dinf-grid", { role: "list" });
    sec.append(h, grid);
    sections[role] = { sec, h, grid };
    body.append(sec);
  }

  // training images chosen with the lasso in the 2-D map
  const chosenSec = el("section", "dinf-section dinf-chosen");
  const chosenHead = el("h4", "dinf-section-title");
  const chosenClear = el("button", "dinf-chosen-clear", { type: "button", title: "Clear the list" });
  chosenClear.textContent = "clear";
  const chosenGrid = el("div", "dinf-grid", { role: "list" });
  chosenSec.append(chosenHead, chosenGrid);
  chosenSec.hidden = true;
  body.append(chosenSec);
  let chosenUrls = [];

  const pager = el("nav", "dinf-pager", { "aria-label": "Gallery pages" });
  const prev = el("button", "dinf-page-prev", { type: "button", "aria-label": "Previous page", title: "Previous page (PageUp)" });
  prev.textContent = "‹ prev";
  const pageInfo = el("span", "dinf-page-info", { "aria-live": "polite" });
  const next = el("button", "dinf-page-next", { type: "button", "aria-label": "Next page", title: "Next page (PageDown)" });
  next.textContent = "next ›";
  pager.append(prev, pageInfo, next);

  const zoom = el("div", "dinf-zoom", { role: "dialog", "aria-label": "Larger view", "aria-live": "polite" });
  zoom.hidden = true;
  const zoomImg = el("img", "dinf-zoom-img", { alt: "" });
  const zoomText = el("div", "dinf-zoom-text");
  const zoomClose = el("button", "dinf-zoom-close", { type: "button", "aria-label": "Close larger view", title: "Close (Escape)" });
  zoomClose.textContent = "×";
  zoom.append(zoomClose, zoomImg, zoomText);

  const main = el("div", "dinf-gallery-main");
  main.append(query, body, zoom);
  root.append(head, sign, readout, error, main, pager);

  let urls = [];
  let zoomUrl = null;
  let focusKey = null; // {role, index} of the tile that should hold focus after a redraw
  let hoverTimer = null;

  const tiles = () => [...root.querySelectorAll(".dinf-tile[data-role]")];

  function openZoom(tile, pin) {
    const { role, id, score, rank, label } = tile.dataset;
    zoomImg.src = tile.querySelector("img").src;
    zoomImg.alt = `${role} ${rank}: training image ${id}`;
    zoomText.textContent = `${role} #${rank} · training image ${id}${label ? " (class " + label + ")" : ""} · score ${fmt(Number(score))}`;
    zoomText.title = `exact score ${tile.dataset.scoreText}`;
    zoom.hidden = false;
    zoom.dataset.id = id;
    zoom.dataset.pinned = pin ? "1" : "";
    for (const t of tiles()) t.classList.toggle("dinf-selected", t === tile && pin);
    if (pin) {
      model.set("selected_id", Number(id));
      model.save_changes();
    }
  }

  function closeZoom() {
    zoom.hidden = true;
    zoom.dataset.pinned = "";
  }

  function focusTile(t) {
    if (!t) return;
    for (const x of tiles()) x.tabIndex = -1;
    t.tabIndex = 0;
    t.focus();
    focusKey = { role: t.dataset.role, index: Number(t.dataset.index) };
  }

  function drawGrid(role) {
    const items = model.get(`${role}s`) || [];
    const thumbs = model.get(`${role}_thumbs`) || [];
    const { h, grid } = sections[role];
    const total = model.get(`${role}_total`) || 0;
    const titles = model.get("titles") || ["Proponents", "Opponents"];
    h.textContent = `${titles[role === "proponent" ? 0 : 1]} · ${total}`;
    const frag = document.createDocumentFragment();
    const selected = model.get("selected_id");
    items.forEach((it, i) => {
      const t = el("button", "dinf-tile", {
        type: "button", role: "listitem",
        "aria-label": `${role === "proponent" ? "Proponent" : "Opponent"} ${it.rank}: training image ${it.id}` +
          `${it.label ? ", class " + it.label : ""}, score ${it.score_text}`,
        title: `training image ${it.id}${it.label ? " (class " + it.label + ")" : ""}\nscore ${it.score_text}\n(click or Enter for a larger view)`,
      });
      t.tabIndex = -1;
      Object.assign(t.dataset, { role, index: String(i), id: String(it.id), score: String(it.score),
        scoreText: it.score_text, rank: String(it.rank), label: it.label || "" });
      if (it.id === selected) t.classList.add("dinf-selected");
      const img = el("img", "dinf-thumb", { alt: `training image ${it.id}`, draggable: "false" });
      if (thumbs[i]) {
        const u = blobUrl(thumbs[i]);
        urls.push([img, u]);
        img.src = u;
      }
      const idl = el("span", "dinf-tile-id");
      idl.textContent = `#${it.id}`;
      if (it.label) {
        const lab = el("span", "dinf-tile-label", { title: "class label" });
        lab.textContent = it.label;
        idl.append(" · ", lab);
      }
      const cap = el("span", "dinf-tile-caption");
      const rank = el("span", "dinf-rank");
      rank.textContent = `${it.rank}.`;
      const sc = el("span", `dinf-score dinf-score-${it.score >= 0 ? "pos" : "neg"}`);
      sc.textContent = fmt(it.score);
      cap.append(rank, sc);
      t.append(img, idl, cap);
      frag.append(t);
    });
    grid.replaceChildren(frag);
  }

  function release() {
    // stop pending loads before revoking, so a detached <img> never fetches a revoked blob URL
    for (const [img, u] of urls) { img.removeAttribute("src"); URL.revokeObjectURL(u); }
    urls = [];
  }

  function draw() {
    const zoomShared = urls.some(([, u]) => u === zoomImg.getAttribute("src"));
    if (zoomShared) zoomImg.removeAttribute("src");
    release();
    const hadFocus = root.contains(document.activeElement) && document.activeElement.classList.contains("dinf-tile");
    drawGrid("proponent");
    drawGrid("opponent");
    const page = model.get("page"), pages = model.get("num_pages");
    pageInfo.textContent = `page ${page + 1} / ${Math.max(pages, 1)}`;
    prev.disabled = page <= 0;
    next.disabled = page >= pages - 1;
    pager.hidden = pages <= 1;
    const all = tiles();
    if (all.length) {
      let t = null;
      if (focusKey) t = all.find((x) => x.dataset.role === focusKey.role && Number(x.dataset.index) === focusKey.index)
        || all.find((x) => x.dataset.role === focusKey.role) || null;
      t = t || all[0];
      t.tabIndex = 0;
      if (hadFocus) t.focus();
    }
    if (!zoom.hidden && zoom.dataset.pinned) {
      const z = all.find((x) => x.dataset.id === zoom.dataset.id);
      if (z) { openZoom(z, false); zoom.dataset.pinned = "1"; }
      else if (zoomShared) closeZoom();
    } else if (zoomShared) closeZoom();
    // Mark the request as rendered only once every thumbnail is decoded (tests and the bench wait on this).
    const rid = model.get("request_id"), version = model.get("version");
    const imgs = [...root.querySelectorAll("img.dinf-thumb")];
    root.dataset.requestId = String(rid);
    Promise.all(imgs.map((i) => (i.src ? i.decode().catch(() => null) : null))).then(() => {
      if (model.get("version") === version) {
        root.dataset.renderedRequest = String(rid);
        root.dataset.renderedPage = String(page);
        root.dataset.renderedVersion = String(version);
      }
    });
  }

  function drawChosen() {
    for (const u of chosenUrls) URL.revokeObjectURL(u);
    chosenUrls = [];
    const items = model.get("chosen") || [];
    const thumbs = model.get("chosen_thumbs") || [];
    chosenSec.hidden = !items.length;
    chosenHead.replaceChildren(`Chosen in the gradient map · ${items.length} (by score) `, chosenClear);
    const frag = document.createDocumentFragment();
    items.forEach((it, i) => {
      const t = el("div", "dinf-tile dinf-chosen-tile", { role: "listitem",
        "aria-label": `chosen training image ${it.id}${it.label ? ", class " + it.label : ""}, score ${it.score_text}` });
      t.dataset.id = String(it.id);
      const img = el("img", "dinf-thumb", { alt: `training image ${it.id}` });
      if (thumbs[i]) { const u = blobUrl(thumbs[i]); chosenUrls.push(u); img.src = u; }
      const idl = el("span", "dinf-tile-id");
      idl.textContent = `#${it.id}${it.label ? " · " + it.label : ""}`;
      const sc = el("span", `dinf-score dinf-score-${it.score >= 0 ? "pos" : "neg"}`);
      sc.textContent = fmt(it.score);
      t.append(img, idl, sc);
      frag.append(t);
    });
    chosenGrid.replaceChildren(frag);
  }

  let previewUrl = null;
  function drawPreview() {
    const dv = model.get("preview_thumb");
    if (!dv || !dv.byteLength || zoom.dataset.pinned) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = blobUrl(dv);
    zoomImg.src = previewUrl;
    zoomText.textContent = model.get("preview_text") || "";
    zoomText.title = "";
    zoom.hidden = false;
    zoom.dataset.id = "";
  }

  function drawQuery() {
    const dv = model.get("query_thumb");
    if (queryUrl) { queryImg.removeAttribute("src"); URL.revokeObjectURL(queryUrl); queryUrl = null; }
    if (dv && dv.byteLength) {
      queryUrl = blobUrl(dv);
      queryImg.src = queryUrl;
    }
    const text = model.get("query_text") || "";
    queryImg.alt = text || "query image";
    queryText.textContent = text;
    query.hidden = !(dv && dv.byteLength);
  }

  function drawMeta() {
    caption.textContent = model.get("caption") || "";
    const b = model.get("badge") || "";
    badge.textContent = b;
    badge.hidden = !b;
    badge.dataset.exact = b.startsWith("exact") ? "true" : "false";
    sign.textContent = model.get("sign_text") || "";
    readout.textContent = model.get("readout") || "";
    readout.hidden = !model.get("readout");
    const err = model.get("error") || "";
    error.textContent = err;
    error.hidden = !err;
    const busy = model.get("busy");
    state.textContent = busy ? (model.get("progress") || "updating…") : "";
    root.classList.toggle("dinf-is-busy", !!busy);
    root.dataset.state = err ? "error" : busy ? "busy" : "ready";
  }

  function drawSelected() {
    const sel = model.get("selected_id");
    for (const t of tiles()) t.classList.toggle("dinf-selected", Number(t.dataset.id) === sel);
    const dv = model.get("selected_thumb");
    if (sel >= 0 && dv && dv.byteLength) {
      if (zoomUrl) URL.revokeObjectURL(zoomUrl);
      zoomUrl = blobUrl(dv);
      zoomImg.src = zoomUrl;
      zoomImg.alt = `training image ${sel}`;
      zoomText.textContent = model.get("selected_text") || `training image ${sel}`;
      zoomText.title = "";
      zoom.hidden = false;
      zoom.dataset.id = String(sel);
      zoom.dataset.pinned = "1";
    }
  }

  function setPage(p) {
    const pages = model.get("num_pages");
    p = Math.max(0, Math.min(pages - 1, p));
    if (p !== model.get("page")) {
      model.set("page", p);
      model.save_changes();
    }
  }

  prev.addEventListener("click", () => setPage(model.get("page") - 1), { signal });
  next.addEventListener("click", () => setPage(model.get("page") + 1), { signal });
  zoomClose.addEventListener("click", closeZoom, { signal });

  body.addEventListener("click", (e) => {
    const t = e.target.closest(".dinf-tile");
    if (t) { clearTimeout(hoverTimer); focusTile(t); openZoom(t, true); }
  }, { signal });
  body.addEventListener("mouseover", (e) => {
    const t = e.target.closest(".dinf-tile");
    if (!t || zoom.dataset.pinned) return;
    clearTimeout(hoverTimer);
    // re-checked when the timer fires: a click in between pins the view, and a preview must not unpin it
    hoverTimer = setTimeout(() => { if (!zoom.dataset.pinned) openZoom(t, false); }, 120);
  }, { signal });
  body.addEventListener("mouseleave", () => {
    clearTimeout(hoverTimer);
    if (!zoom.dataset.pinned) closeZoom();
  }, { signal });

  root.addEventListener("keydown", (e) => {
    const all = tiles();
    const cur = document.activeElement && document.activeElement.closest && document.activeElement.closest(".dinf-tile");
    if (e.key === "Escape") { closeZoom(); e.preventDefault(); return; }
    if (e.key === "PageDown" || (e.key === "n" && !e.ctrlKey && !e.metaKey)) {
      setPage(model.get("page") + 1); e.preventDefault(); return;
    }
    if (e.key === "PageUp" || (e.key === "p" && !e.ctrlKey && !e.metaKey)) {
      setPage(model.get("page") - 1); e.preventDefault(); return;
    }
    if (!cur || !all.length) return;
    const role = cur.dataset.role, idx = Number(cur.dataset.index);
    const same = all.filter((x) => x.dataset.role === role);
    const other = all.filter((x) => x.dataset.role !== role);
    const perRow = Math.max(1, Math.round(sections[role].grid.clientWidth / (cur.offsetWidth + 6)) || 1);
    let target = null;
    switch (e.key) {
      case "ArrowRight": target = same[idx + 1] || other[0]; break;
      case "ArrowLeft": target = same[idx - 1] || null; break;
      case "ArrowDown": target = same[idx + perRow] || (role === "proponent" ? other[Math.min(idx % perRow, other.length - 1)] : null); break;
      case "ArrowUp": target = same[idx - perRow] || (role === "opponent" ? other[Math.min(idx % perRow, other.length - 1)] : null); break;
      case "Home": target = all[0]; break;
      case "End": target = all[all.length - 1]; break;
      case "Enter": case " ": openZoom(cur, true); e.preventDefault(); return;
      default: return;
    }
    e.preventDefault();
    if (target) {
      focusTile(target);
      if (!zoom.hidden) openZoom(target, !!zoom.dataset.pinned);
    }
  }, { signal });

  model.on("change:version", draw);
  model.on("change:caption change:badge change:sign_text change:readout change:error change:busy change:progress", drawMeta);
  model.on("change:selected_id change:selected_thumb change:selected_text", drawSelected);
  model.on("change:query_thumb change:query_text", drawQuery);
  model.on("change:chosen", drawChosen);
  model.on("change:preview_thumb change:preview_text", drawPreview);
  chosenClear.addEventListener("click", () => { model.set("chosen", []); model.set("chosen_thumbs", []); model.save_changes(); }, { signal });
  drawChosen();
  drawMeta();
  drawQuery();
  draw();
  drawSelected();
  // Served app: leaving or reloading the page frees its kernel at once. Voila's own shutdown request on unload is
  // refused (no XSRF token: voila#1458), which left each reloaded page's kernel alive until culled.
  // Only on a Voila page (its page config says appUrl "voila/"): the same app opened in JupyterLab keeps its kernel.
  let pageConfig = {};
  try { pageConfig = JSON.parse(document.getElementById("jupyter-config-data").textContent); } catch (e) { /* none */ }
  const leave = () => {
    const id = model.get("voila_kernel_id");
    if (!id || !/^[0-9a-f-]{8,64}$/i.test(id) || pageConfig.appUrl !== "voila/") return;
    if (pageConfig.kernelId && pageConfig.kernelId !== id) return;  // (Voila's lab template names the page's kernel)
    const base = pageConfig.baseUrl || "/";
    // a token-authenticated request needs no XSRF token (the page's own URL carries the server's token); else the
    // _xsrf cookie, when the server set one
    const headers = {};
    const token = new URLSearchParams(window.location.search).get("token");
    if (token) headers["Authorization"] = `token ${token}`;
    const xsrf = (document.cookie.match(/(?:^|;\s*)_xsrf=([^;]*)/) || [])[1];
    if (xsrf) headers["X-XSRFToken"] = decodeURIComponent(xsrf);
    try {
      fetch(`${base.replace(/\/?$/, "/")}voila/api/shutdown/${id}`, {
        method: "POST", keepalive: true, credentials: "same-origin", headers,
      }).catch(() => {});
    } catch (e) { /* the page is going away */ }
  };
  window.addEventListener("pagehide", leave, { signal });
  return () => {
    release();
    if (zoomUrl) URL.revokeObjectURL(zoomUrl);
    if (queryUrl) URL.revokeObjectURL(queryUrl);
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    for (const u of chosenUrls) URL.revokeObjectURL(u);
    model.off(null, drawChosen);
    model.off(null, drawPreview);
    model.off(null, drawQuery);
    model.off("change:version", draw);
    model.off(null, drawMeta);
    model.off(null, drawSelected);
  };
}

export default { render };
