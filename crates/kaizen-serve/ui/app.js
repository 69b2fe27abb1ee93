// kaizen ui: plain JS, no build step. Talks to /api/* (runs, files, events) and to /v1/*
// (kaizen serve's OpenAI routes) for the chat.
"use strict";
const $ = (s, el = document) => el.querySelector(s);
const $$ = (s, el = document) => [...el.querySelectorAll(s)];
const COLORS = ["#2b6cb0", "#c05621", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f", "#2c7a7b", "#97266d"];

async function api(path, body, method) {
  const opt = body === undefined ? { method: method || "GET" }
    : { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opt);
  const text = await r.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { data = { text }; }
  if (!r.ok) throw new Error((data && data.error && data.error.message) || text || r.statusText);
  return data;
}
function say(el, text, err) { el.textContent = text; el.classList.toggle("err", !!err); }
function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
function fmt(x, d = 4) { return x === null || x === undefined ? "–" : (+x).toFixed(d); }
function bytes(b) {
  if (!b) return "–";
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (b >= 1024 && i < 3) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + u[i];
}

// ---- views
function show(view) {
  $$("nav button").forEach(b => b.classList.toggle("on", b.dataset.view === view));
  $$(".view").forEach(v => v.classList.toggle("on", v.id === view));
  if (view === "runs") loadRuns();
  if (view === "live") refreshLiveList();
  if (view === "chat") loadChatChoices();
}
$$("nav button").forEach(b => b.onclick = () => show(b.dataset.view));

// ---- an SVG line chart: series [{name, points: [[x, y]], color, dash}]
function chart(el, series, opts = {}) {
  const W = 640, H = 260, L = 56, R = 12, T = 24, B = 34;
  const pts = series.flatMap(s => s.points).filter(p => isFinite(p[1]));
  if (!pts.length) { el.innerHTML = `<p class="msg" style="padding:1em">${esc(opts.empty || "no points yet")}</p>`; return; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05; y0 = y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad; y1 += pad;
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  let s = `<svg viewBox="0 0 ${W} ${H}" xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="sans-serif">`;
  s += `<text x="${L}" y="15" font-weight="600">${esc(opts.title || "")}</text>`;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    s += `<line x1="${L}" x2="${W - R}" y1="${Y(y)}" y2="${Y(y)}" stroke="#eee"/>`;
    s += `<text x="${L - 4}" y="${Y(y) + 4}" text-anchor="end">${+y.toPrecision(3)}</text>`;
    s += `<text x="${X(x)}" y="${H - B + 14}" text-anchor="middle">${+x.toPrecision(4)}</text>`;
  }
  s += `<text x="${(L + W) / 2}" y="${H - 4}" text-anchor="middle" fill="#666">${esc(opts.x || "step")}</text>`;
  s += `<rect x="${L}" y="${T}" width="${W - L - R}" height="${H - T - B}" fill="none" stroke="#ccc"/>`;
  let lx = L + 8;
  series.forEach((sr, i) => {
    const c = sr.color || COLORS[i % COLORS.length];
    const p = sr.points.filter(q => isFinite(q[1]));
    if (!p.length) return;
    s += `<polyline fill="none" stroke="${c}" stroke-width="1.8" ${sr.dash ? 'stroke-dasharray="5 3"' : ""} points="${p.map(q => X(q[0]).toFixed(1) + "," + Y(q[1]).toFixed(1)).join(" ")}"/>`;
    if (p.length < 40 || sr.dots) p.forEach(q => { s += `<circle cx="${X(q[0])}" cy="${Y(q[1])}" r="2.5" fill="${c}"/>`; });
    s += `<text x="${lx}" y="${T + 14}" fill="${c}">${esc(sr.name)}</text>`;
    lx += 8 + 7 * sr.name.length;
  });
  el.innerHTML = s + "</svg>";
  el.dataset.points = pts.length;
}

// ---- new run
const form = $("#train-form");
function methodFields() {
  const m = $("#method").value;
  $$("label[data-for]", form).forEach(l => l.classList.toggle("hidden", !l.dataset.for.split(" ").includes(m)));
}
$("#method").onchange = methodFields;
function formBody() {
  const options = {};
  $$("input[name], select[name]", form).forEach(el => {
    if (el.name === "name" || el.closest("label.hidden")) return;
    if (el.type === "checkbox") { if (el.checked) options[el.name] = "true"; }
    else if (el.value.trim()) options[el.name] = el.value.trim();
  });
  return { name: $("#run-name").value.trim(), options };
}
async function loadFiles() {
  try {
    const f = await api("/api/files");
    $("#models").innerHTML = f.models.map(m => `<option value="${esc(m)}">`).join("");
    $("#datas").innerHTML = f.data.map(m => `<option value="${esc(m)}">`).join("");
    if (!$("#model").value && f.models.length) $("#model").value = f.models[0];
    if (!$("#data").value && f.data.length) $("#data").value = f.data[0];
  } catch (e) { say($("#form-msg"), e.message, true); }
}
$("#preview-btn").onclick = async () => {
  const b = formBody().options;
  try {
    const p = await api("/api/preview", { model: b.model || "", data: b.data || "", template: b.template, max_len: +b["max-len"] || undefined });
    $("#preview").innerHTML = `<h3>First examples, template ${esc(p.template)}: <span class="learn">learned</span> and <span class="mask">masked</span> tokens</h3>` +
      p.examples.map(ex => `<div class="example">${ex.map(s => `<span class="${s.learn ? "learn" : "mask"}" title="${s.tokens} tokens">${esc(s.text)}</span>`).join("")}</div>`).join("");
    say($("#form-msg"), "");
  } catch (e) { say($("#form-msg"), e.message, true); }
};
$("#check-btn").onclick = async () => {
  try {
    const r = await api("/api/check", formBody());
    say($("#form-msg"), "ok: kaizen train " + r.args.join(" "));
  } catch (e) { say($("#form-msg"), e.message, true); }
};
form.onsubmit = async ev => {
  ev.preventDefault();
  const body = formBody();
  $("#start-btn").disabled = true;
  say($("#form-msg"), "starting…");
  try {
    const r = await api("/api/runs", body);
    say($("#form-msg"), `started ${r.name} (${r.status})`);
    show("live");
    await refreshLiveList(r.name);
  } catch (e) { say($("#form-msg"), e.message, true); }
  $("#start-btn").disabled = false;
};

// ---- live run
let live = null; // {name, source, metrics: [], run}
async function refreshLiveList(select) {
  const { runs } = await api("/api/runs");
  const sel = $("#live-run");
  const keep = select || sel.value || (runs.find(r => r.status === "running") || runs[runs.length - 1] || {}).name;
  sel.innerHTML = runs.map(r => `<option>${esc(r.name)}</option>`).join("");
  if (keep) { sel.value = keep; if (!live || live.name !== keep || select) follow(keep); }
}
$("#live-run").onchange = () => follow($("#live-run").value);
function follow(name) {
  if (live && live.source) live.source.close();
  live = { name, metrics: [], run: null, status: {} };
  $("#log").textContent = "";
  drawLive();
  api("/api/run?name=" + encodeURIComponent(name)).then(r => {
    live.run = r;
    $("#options").textContent = JSON.stringify(r.options, null, 2);
    drawLive();
  }).catch(e => say($("#live-msg"), e.message, true));
  const src = new EventSource("/api/run/events?name=" + encodeURIComponent(name));
  live.source = src;
  src.addEventListener("metric", e => { live.metrics.push(JSON.parse(e.data)); drawLive(); });
  src.addEventListener("reset", () => { live.metrics = []; drawLive(); });
  src.addEventListener("log", e => {
    const pre = $("#log");
    pre.textContent += JSON.parse(e.data);
    pre.scrollTop = pre.scrollHeight;
  });
  src.addEventListener("status", e => {
    live.status = JSON.parse(e.data);
    if (live.status.status !== "running" && live.run) {
      api("/api/run?name=" + encodeURIComponent(name)).then(r => { live.run = r; drawLive(); });
    }
    drawLive();
  });
}
function drawLive() {
  if (!live) return;
  const steps = live.metrics.filter(m => m.loss !== undefined);
  const evals = live.metrics.filter(m => m.eval_loss !== undefined);
  chart($("#loss-chart"), [
    { name: "train loss", points: steps.map(m => [m.step, m.loss]) },
    { name: "held-out loss", points: evals.map(m => [m.step, m.eval_loss]), dots: true },
  ], { title: "loss" });
  chart($("#lr-chart"), [{ name: "learning rate", points: steps.map(m => [m.step, m.lr]) }], { title: "learning rate" });
  const last = steps[steps.length - 1] || {};
  const total = live.run && live.run.options && live.run.options.max_steps;
  const st = live.status.status || (live.run && live.run.status) || "";
  let eta = "–";
  if (st === "running" && last.step && total && steps.length > 1) {
    const first = steps[0];
    const per = (last.elapsed - first.elapsed) / Math.max(1, last.step - first.step);
    eta = Math.max(0, Math.round(per * (total - last.step))) + " s";
  }
  const badge = $("#live-status");
  badge.textContent = st; badge.className = "badge " + st;
  $("#stop-btn").disabled = st !== "running";
  $("#resume-btn").disabled = !(st === "stopped" && live.run && live.run.resumable);
  const lastEval = evals[evals.length - 1];
  $("#stats").innerHTML = [
    ["step", (last.step || 0) + (total ? " / " + total : "")],
    ["train loss", fmt(last.loss)],
    ["held-out loss", lastEval ? fmt(lastEval.eval_loss) : "–"],
    ["learning rate", last.lr === undefined ? "–" : (+last.lr).toExponential(2)],
    ["tokens/s", last.tokens_per_sec === undefined ? "–" : Math.round(last.tokens_per_sec)],
    ["ETA", eta],
    ["memory (RSS)", bytes(live.status.rss)],
  ].map(([k, v]) => `<div>${k}<b id="stat-${k.split(" ")[0].replace("/", "")}">${v}</b></div>`).join("");
}
$("#stop-btn").onclick = async () => {
  try { await api("/api/run/stop?name=" + encodeURIComponent(live.name), {}); say($("#live-msg"), "stopping after this step (a checkpoint is written)…"); }
  catch (e) { say($("#live-msg"), e.message, true); }
};
$("#resume-btn").onclick = async () => {
  say($("#live-msg"), "resuming…");
  try {
    const r = await api("/api/run/resume?name=" + encodeURIComponent(live.name), {});
    say($("#live-msg"), "resumed (" + r.status + ")");
    follow(live.name);
  } catch (e) { say($("#live-msg"), e.message, true); }
};

// ---- runs
const PARAMS = ["r", "lora_alpha", "use_dora", "num_virtual_tokens", "reduction_factor", "encoder_reparameterization_type"];
async function loadRuns() {
  const { runs } = await api("/api/runs");
  $("#runs-table tbody").innerHTML = runs.map(r => {
    const a = (r.options && r.options.adapter) || {};
    const p = PARAMS.filter(k => a[k] !== undefined && a[k] !== null && a[k] !== false).map(k => `${k}=${a[k]}`).join(", ");
    return `<tr><td><input type="checkbox" class="pick" value="${esc(r.name)}"></td>
      <td><a href="#" class="open" data-name="${esc(r.name)}">${esc(r.name)}</a></td>
      <td><span class="badge ${r.status}">${r.status}</span></td><td>${esc(r.method || "")}</td><td>${esc(p)}</td>
      <td>${r.step || 0} / ${(r.options && r.options.max_steps) || "?"}</td><td>${fmt(r.loss)}</td>
      <td>${fmt(r.first_eval_loss)} → ${fmt(r.eval_loss)}</td><td>${bytes(r.size)}</td></tr>`;
  }).join("");
  $$("#runs-table .pick").forEach(c => c.onchange = overlay);
  $$("#runs-table .open").forEach(a => a.onclick = ev => { ev.preventDefault(); show("live"); refreshLiveList(a.dataset.name); });
  overlay();
  const { reports } = await api("/api/reports");
  $("#reports").innerHTML = reports.length ? reports.map(n => `<li><a href="#" data-name="${esc(n)}">${esc(n)}</a></li>`).join("")
    : "<li class=msg>none under --runs (kaizen compare --out RUNS/NAME writes one)</li>";
  $$("#reports a").forEach(a => a.onclick = ev => { ev.preventDefault(); openReport(a.dataset.name); });
}
async function overlay() {
  const names = $$("#runs-table .pick:checked").map(c => c.value);
  const series = [];
  for (const [i, n] of names.entries()) {
    const { metrics } = await api("/api/run/metrics?name=" + encodeURIComponent(n));
    const c = COLORS[i % COLORS.length];
    series.push({ name: n, color: c, points: metrics.filter(m => m.loss !== undefined).map(m => [m.step, m.loss]) });
    series.push({ name: n + " held-out", color: c, dash: true, dots: true, points: metrics.filter(m => m.eval_loss !== undefined).map(m => [m.step, m.eval_loss]) });
  }
  chart($("#overlay-chart"), series, { title: "loss of the selected runs (dashed: held-out)", empty: "select runs to overlay their curves" });
}
// A small Markdown subset: headings, tables, images, paragraphs.
function markdown(md, img) {
  const out = []; let table = null;
  const inline = s => esc(s).replace(/\*\*(.+?)\*\*/g, "<b>$1</b>").replace(/`(.+?)`/g, "<code>$1</code>");
  for (const line of md.split("\n")) {
    if (/^\|/.test(line)) {
      if (/^\|[\s:|-]+\|$/.test(line)) continue;
      const cells = line.split("|").slice(1, -1).map(c => inline(c.trim()));
      if (!table) { table = []; out.push("<table>"); out.push("<tr>" + cells.map(c => `<th>${c}</th>`).join("") + "</tr>"); }
      else out.push("<tr>" + cells.map(c => `<td>${c}</td>`).join("") + "</tr>");
      continue;
    }
    if (table) { out.push("</table>"); table = null; }
    const m = line.match(/^!\[(.*)\]\((.+)\)$/);
    if (m) out.push(`<img alt="${esc(m[1])}" src="${img(m[2])}">`);
    else if (/^#+ /.test(line)) { const h = line.match(/^#+/)[0].length; out.push(`<h${h + 1}>${inline(line.slice(h + 1))}</h${h + 1}>`); }
    else if (line.trim()) out.push(`<p>${inline(line)}</p>`);
  }
  if (table) out.push("</table>");
  return out.join("\n");
}
async function openReport(name) {
  const r = await api("/api/report?name=" + encodeURIComponent(name));
  const img = f => `/api/report/file?name=${encodeURIComponent(name)}&file=${encodeURIComponent(f)}`;
  const shown = new Set();
  let html = markdown(r.markdown, f => { shown.add(f); return img(f); });
  const rest = r.charts.filter(c => !shown.has(c));
  html += rest.map(c => `<img alt="${esc(c)}" src="${img(c)}">`).join("");
  $("#report").innerHTML = html;
}

// ---- chat
let chatTargets = []; // names for the `model` field: "base" and run names
const history = {};   // target -> [{role, content}]
async function loadChatChoices() {
  const [f, { runs }] = await Promise.all([api("/api/files"), api("/api/runs")]);
  const sel = $("#chat-model"), keep = sel.value;
  sel.innerHTML = `<option value="">the runs' base model</option>` + f.models.map(m => `<option>${esc(m)}</option>`).join("");
  if (keep) sel.value = keep;
  // Full and freeze tuning write a whole model: it is offered as a base model instead.
  const done = runs.filter(r => r.status === "finished" && !["full", "freeze"].includes(r.method));
  const checked = new Set($$("#chat-runs input:checked").map(c => c.value));
  $("#chat-runs").innerHTML = done.length ? done.map(r => `<label class="check"><input type="checkbox" value="${esc(r.name)}" ${checked.has(r.name) ? "checked" : ""}> ${esc(r.name)}</label>`).join("")
    : `<span class="msg">no finished run yet</span>`;
}
$("#chat-load").onclick = async () => {
  const runs = $$("#chat-runs input:checked").map(c => c.value);
  say($("#chat-msg"), "loading…");
  try {
    const r = await api("/api/chat/load", { model: $("#chat-model").value || null, runs });
    chatTargets = [r.base, ...runs];
    chatTargets.forEach(t => history[t] = history[t] || []);
    drawColumns();
    say($("#chat-msg"), "ready: " + r.model);
  } catch (e) { say($("#chat-msg"), e.message, true); }
};
$("#chat-clear").onclick = () => { chatTargets.forEach(t => history[t] = []); drawColumns(); };
function drawColumns() {
  $("#columns").innerHTML = chatTargets.map((t, i) => `<div class="column" data-target="${esc(t)}" id="col-${i}">
    <h4>${t === "base" ? "base model" : "adapter: " + esc(t)}</h4>
    ${history[t].map(m => `<div class="turn ${m.role}">${esc(m.content)}</div>`).join("")}</div>`).join("");
}
async function stream(target, col) {
  const body = {
    model: target, messages: history[target], stream: true,
    temperature: +$("#temperature").value, top_p: +$("#top_p").value, max_tokens: +$("#max_tokens").value,
  };
  if ($("#chat-seed").value) body.seed = +$("#chat-seed").value;
  const out = document.createElement("div");
  out.className = "turn assistant";
  col.appendChild(out);
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  if (!r.ok) { const e = await r.json().catch(() => ({})); out.textContent = "error: " + ((e.error && e.error.message) || r.statusText); return; }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      const data = ev.split("\n").filter(l => l.startsWith("data:")).map(l => l.slice(5).trim()).join("");
      if (!data || data === "[DONE]") continue;
      const c = JSON.parse(data);
      if (c.error) { text += "\n[error: " + c.error.message + "]"; }
      const d = c.choices && c.choices[0] && c.choices[0].delta;
      if (d && d.content) text += d.content;
      out.textContent = text;
    }
  }
  history[target].push({ role: "assistant", content: text });
  col.dataset.done = (+(col.dataset.done || 0) + 1);
}
$("#chat-form").onsubmit = async ev => {
  ev.preventDefault();
  const p = $("#prompt").value.trim();
  if (!p || !chatTargets.length) { say($("#chat-msg"), chatTargets.length ? "write a prompt" : "load a model first", true); return; }
  $("#prompt").value = "";
  chatTargets.forEach(t => history[t].push({ role: "user", content: p }));
  drawColumns();
  $("#send-btn").disabled = true;
  await Promise.all(chatTargets.map((t, i) => stream(t, $("#col-" + i)).catch(e => say($("#chat-msg"), e.message, true))));
  $("#send-btn").disabled = false;
};

methodFields();
loadFiles();
