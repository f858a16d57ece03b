// A plotly.js figure drawn from a JSON spec (`figure` = {data, layout}) with Plotly.react on every change.
// plotly.js itself (~4.8 MB, from the installed plotly package) is fetched once per page through the widget
// channel: the first view asks Python for it ({type: "need-plotly"}) and gets it back as one binary buffer;
// every other view waits on the same promise. No CDN, and no 5 MB module per figure.

function loadPlotly(model) {
  if (window.__dinfPlotly) return window.__dinfPlotly;
  window.__dinfPlotly = new Promise((resolve, reject) => {
    const onMsg = (msg, buffers) => {
      if (!msg || msg.type !== "plotly") return;
      model.off("msg:custom", onMsg);
      try {
        const src = new TextDecoder().decode(buffers[0]);
        const mod = { exports: {} };
        // the bundle is UMD: with a CommonJS-style `module` it hands Plotly back instead of touching globals
        new Function("module", "exports", src)(mod, mod.exports);
        resolve(mod.exports);
      } catch (e) {
        window.__dinfPlotly = null;
        reject(e);
      }
    };
    model.on("msg:custom", onMsg);
    model.send({ type: "need-plotly" });
  });
  return window.__dinfPlotly;
}

function render({ model, el, signal }) {
  el.classList.add("dinf-plotly");
  const div = document.createElement("div");
  div.className = "dinf-plotly-div";
  const msg = document.createElement("div");
  msg.className = "dinf-plotly-msg";
  msg.textContent = "loading plot…";
  el.append(msg, div);
  let Plotly = null;
  let drawn = Promise.resolve();
  let bound = false;

  const draw = () => {
    if (!Plotly) return;
    const fig = model.get("figure") || {};
    const version = model.get("version");
    drawn = drawn.then(() => Plotly.react(div, fig.data || [], fig.layout || {},
      { displaylogo: false, modeBarButtonsToRemove: model.get("selectable") ? [] : ["select2d", "lasso2d"] }))
      .then(() => {
        // Plotly gives the div its event API (div.on) only once it has drawn into it
        if (!bound && typeof div.on === "function") {
          bound = true;
          div.on("plotly_click", (ev) => {
            const p = ev && ev.points && ev.points[0];
            if (!p) return;
            model.send({ type: "click", curve: p.curveNumber, index: p.pointNumber,
              customdata: p.customdata === undefined ? null : p.customdata });
          });
          // hover and lasso / box selection go to Python as the points' customdata (training ids)
          let hoverTimer = null;
          div.on("plotly_hover", (ev) => {
            const p = ev && ev.points && ev.points[0];
            if (!p || p.customdata === undefined) return;
            clearTimeout(hoverTimer);
            hoverTimer = setTimeout(() => model.send({ type: "hover", customdata: p.customdata }), 80);
          });
          div.on("plotly_selected", (ev) => {
            const ids = ((ev && ev.points) || []).map((p) => p.customdata).filter((c) => c !== undefined && c !== null);
            model.send({ type: "select", customdata: [...new Set(ids)] });
          });
          div.on("plotly_deselect", () => model.send({ type: "select", customdata: [] }));
        }
        el.dataset.version = String(version);
        msg.textContent = "";
      })
      .catch((e) => { msg.textContent = `plot error: ${e}`; });
  };

  // plotly.js is ~4.8 MB to receive and evaluate: ask for it once the page is idle (at most 1.5 s after the
  // view renders), so the gallery — what a user looks at first — is not slowed down by it
  const idle = new Promise((resolve) => (window.requestIdleCallback
    ? window.requestIdleCallback(resolve, { timeout: 1500 }) : setTimeout(resolve, 300)));
  idle.then(() => (signal.aborted ? Promise.reject(new Error("view removed")) : loadPlotly(model))).then((P) => {
    if (signal.aborted) return;
    Plotly = P;
    draw();
  }).catch((e) => { if (!signal.aborted) msg.textContent = `could not load plotly.js: ${e}`; });

  // a figure first drawn in a hidden tab has no width: redraw to the container's size when it gets one
  let lastWidth = 0;
  const ro = new ResizeObserver(() => {
    const w = el.clientWidth;
    if (Plotly && bound && w > 0 && Math.abs(w - lastWidth) > 4) {
      lastWidth = w;
      // width only: the figure's own layout keeps its height
      Plotly.relayout(div, { width: w }).catch(() => null);
    }
  });
  ro.observe(el);

  model.on("change:version", draw);
  return () => {
    ro.disconnect();
    model.off("change:version", draw);
    if (Plotly) Plotly.purge(div);
  };
}

export default { render };
