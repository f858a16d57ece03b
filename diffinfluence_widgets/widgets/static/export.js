// Export panel: each button asks Python for the file; the bytes come back in one message (a binary buffer) and
// are handed to the browser as a download through a Blob URL. The last file stays available as a link.

function render({ model, el: root, signal }) {
  root.classList.add("dinf-export");
  root.setAttribute("role", "group");
  root.setAttribute("aria-label", "Export the current result");
  const bar = document.createElement("div");
  bar.className = "dinf-export-buttons";
  for (const [label, suffix] of model.get("formats") || []) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `dinf-export-btn dinf-export-${suffix.slice(1)}`;
    b.textContent = label;
    b.title = `Download the current result as ${label} (${suffix})`;
    b.addEventListener("click", () => {
      msg.textContent = `preparing ${label}…`;
      model.send({ type: "export", suffix });
    }, { signal });
    bar.append(b);
  }
  const msg = document.createElement("div");
  msg.className = "dinf-export-message";
  msg.setAttribute("aria-live", "polite");
  const link = document.createElement("a");
  link.className = "dinf-export-link";
  link.hidden = true;
  const where = document.createElement("div");
  where.className = "dinf-export-where";
  root.append(bar, msg, link, where);
  let url = null;

  function onMsg(content, buffers) {
    if (!content || content.type !== "file" || !buffers || !buffers.length) return;
    if (url) URL.revokeObjectURL(url);
    url = URL.createObjectURL(new Blob([buffers[0]], { type: content.mime }));
    link.href = url;
    link.download = content.name;
    link.textContent = `download ${content.name} again`;
    link.hidden = false;
    link.click();
  }

  function drawMessage() {
    msg.textContent = model.get("message") || "";
    msg.classList.toggle("dinf-error", !!model.get("error"));
    const f = model.get("folder_text");
    where.textContent = f ? `Copies are also saved on the server in ${f}.` : "Files go to your browser's downloads; nothing is written on the server.";
  }

  model.on("msg:custom", onMsg);
  model.on("change:message change:error change:folder_text", drawMessage);
  drawMessage();
  return () => {
    model.off("msg:custom", onMsg);
    model.off(null, drawMessage);
    if (url) URL.revokeObjectURL(url);
  };
}

export default { render };
