// Query picker: a paginated grid of generated samples and held-out images, plus "generate new" with a seed.
// Thumbnails arrive as binary buffers in `thumbs` (aligned with `items`). Selecting sets `selected`;
// "generate" sends a custom message {type: "generate", seed, request_id}; Python answers through traits.

function el(tag, cls, attrs = {}) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function render({ model, el: root, signal }) {
  root.classList.add("dinf-picker");
  root.setAttribute("role", "region");
  root.setAttribute("aria-label", "Query picker: generated samples and held-out images");
  const title = el("div", "dinf-picker-title");
  title.textContent = "Query";
  const groups = el("div", "dinf-picker-groups");
  const pager = el("nav", "dinf-pager", { "aria-label": "Query pages" });
  const prev = el("button", "dinf-page-prev", { type: "button", "aria-label": "Previous queries", title: "Previous queries" });
  prev.textContent = "‹";
  const info = el("span", "dinf-page-info");
  const next = el("button", "dinf-page-next", { type: "button", "aria-label": "Next queries", title: "Next queries" });
  next.textContent = "›";
  pager.append(prev, info, next);
  const gen = el("div", "dinf-generate");
  const seedLabel = el("label", "dinf-seed-label");
  seedLabel.textContent = "seed ";
  const seed = el("input", "dinf-seed", { type: "number", min: "0", step: "1", "aria-label": "Seed for a new generated query" });
  seedLabel.append(seed);
  const genBtn = el("button", "dinf-generate-btn", { type: "button", "aria-label": "Generate a new query with this seed",
    title: "Sample a new image from the model with this seed and use it as the query" });
  genBtn.textContent = "generate new";
  const genStatus = el("span", "dinf-generate-status", { "aria-live": "polite" });
  gen.append(seedLabel, genBtn, genStatus);
  root.append(title, groups, pager, gen);

  let urls = [];
  let reqId = 0;

  function release() {
    // stop pending loads before revoking, so a detached <img> never fetches a revoked blob URL
    for (const [img, u] of urls) { img.removeAttribute("src"); URL.revokeObjectURL(u); }
    urls = [];
  }

  function markSelected() {
    const sel = model.get("selected");
    for (const b of root.querySelectorAll(".dinf-query")) {
      const on = Number(b.dataset.id) === sel;
      b.classList.toggle("dinf-selected", on);
      b.setAttribute("aria-selected", String(on));
    }
    root.dataset.selected = String(sel);
  }

  function draw() {
    release();
    const items = model.get("items") || [];
    const thumbs = model.get("thumbs") || [];
    const sel = model.get("selected");
    const byKind = new Map();
    items.forEach((it, i) => {
      if (!byKind.has(it.kind)) byKind.set(it.kind, []);
      byKind.get(it.kind).push([it, thumbs[i]]);
    });
    const frag = document.createDocumentFragment();
    for (const [kind, list] of byKind) {
      const h = el("div", "dinf-picker-kind");
      h.textContent = kind === "generated" ? "generated samples" : kind === "heldout" ? "held-out images" : kind;
      const grid = el("div", "dinf-picker-grid", { role: "listbox", "aria-label": h.textContent });
      for (const [it, dv] of list) {
        const b = el("button", "dinf-query", { type: "button", role: "option",
          "aria-label": `Query ${it.id}: ${it.label || it.kind}`, title: `${it.label || it.kind} (id ${it.id})`,
          "aria-selected": String(it.id === sel) });
        b.dataset.id = String(it.id);
        b.dataset.kind = it.kind;
        if (it.id === sel) b.classList.add("dinf-selected");
        const img = el("img", "dinf-query-thumb", { alt: `query ${it.id}`, draggable: "false" });
        if (dv) { const u = URL.createObjectURL(new Blob([dv], { type: "image/png" })); urls.push([img, u]); img.src = u; }
        b.append(img);
        grid.append(b);
      }
      frag.append(h, grid);
    }
    groups.replaceChildren(frag);
    const page = model.get("page"), pages = model.get("num_pages");
    info.textContent = `${page + 1} / ${Math.max(pages, 1)}`;
    prev.disabled = page <= 0;
    next.disabled = page >= pages - 1;
    pager.hidden = pages <= 1;
    if (seed !== document.activeElement) seed.value = String(model.get("seed"));
    root.dataset.selected = String(sel);
    root.dataset.version = String(model.get("version"));
  }

  function drawStatus() {
    const busy = model.get("generating");
    genBtn.disabled = busy;
    genStatus.textContent = busy ? "generating…" : (model.get("message") || "");
  }

  groups.addEventListener("click", (e) => {
    const b = e.target.closest(".dinf-query");
    if (!b) return;
    model.set("selected", Number(b.dataset.id));
    model.save_changes();
  }, { signal });
  groups.addEventListener("keydown", (e) => {
    const b = e.target.closest(".dinf-query");
    if (!b) return;
    const all = [...root.querySelectorAll(".dinf-query")];
    const i = all.indexOf(b);
    let t = null;
    if (e.key === "ArrowRight" || e.key === "ArrowDown") t = all[i + 1];
    else if (e.key === "ArrowLeft" || e.key === "ArrowUp") t = all[i - 1];
    if (t) { t.focus(); e.preventDefault(); }
  }, { signal });
  const turn = (d) => {
    const p = Math.max(0, Math.min(model.get("num_pages") - 1, model.get("page") + d));
    model.set("page", p);
    model.save_changes();
  };
  prev.addEventListener("click", () => turn(-1), { signal });
  next.addEventListener("click", () => turn(1), { signal });
  genBtn.addEventListener("click", () => {
    const s = Number.parseInt(seed.value, 10);
    if (!Number.isFinite(s) || s < 0) { genStatus.textContent = "seed must be a whole number ≥ 0"; return; }
    model.set("seed", s);
    model.save_changes();
    reqId += 1;
    model.send({ type: "generate", seed: s, request_id: reqId });
  }, { signal });
  seed.addEventListener("keydown", (e) => { if (e.key === "Enter") genBtn.click(); }, { signal });

  model.on("change:version", draw);
  model.on("change:selected", markSelected);
  model.on("change:generating change:message", drawStatus);
  draw();
  drawStatus();
  return () => {
    release();
    model.off("change:version", draw);
    model.off("change:selected", markSelected);
    model.off(null, drawStatus);
  };
}

export default { render };
