// The page at GET /: one image through the stages, the live panel and the batch view.
// Plain JavaScript on the public API; the API token (when the server has one) is asked for here
// and kept in this tab's sessionStorage only.
"use strict";

const TOKEN_KEY = "thinkingvit-token";
const BATCH_CHUNK = 16; // images per POST /classify/batch (the server's max_batch_images is 64 by default)
const LIVE_EVERY_MS = 2000;

const state = {
  model: null, // GET /v1/model
  image: null, // the Blob being classified
  imageName: "image",
  truth: null, // the true label of a sample image
  token: sessionStorage.getItem(TOKEN_KEY),
  busy: false, // a classify request is in flight
  again: false, // the threshold or image changed meanwhile: classify once more when it ends
};

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
};
const fmtGmacs = (x) => Number(x).toPrecision(2 + (x < 0.01 ? 0 : 1));
const pct = (x) => `${(100 * x).toFixed(1)} %`;

// ------------------------------------------------------------------------------ the API

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function post(url, form) {
  const response = await fetch(url, { method: "POST", body: form, headers: authHeaders() });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    askForToken(state.token ? "That token was refused." : "");
    throw new Error("this server needs an API token: enter it above");
  }
  if (!response.ok) throw new Error(body.error ? `${body.error.status} ${body.error.reason}: ${body.error.message}` : `HTTP ${response.status}`);
  return body;
}

function askForToken(message) {
  if (message) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
  }
  $("token-box").hidden = false;
  $("token-status").textContent = message;
  $("token-input").focus();
}

// ------------------------------------------------------------------------------ one image

function setImage(blob, name, truth = null) {
  state.image = blob;
  state.imageName = name || "image";
  state.truth = truth;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  classify();
}

async function classify() {
  if (!state.image) return;
  if (state.busy) {
    state.again = true;
    return;
  }
  state.busy = true;
  $("status").className = "muted";
  $("status").textContent = "Thinking…";
  $("result").setAttribute("aria-busy", "true");
  const asked = askedFor();
  if (!asked) return finish("Enter a target accuracy between 0 and 1.");
  const explain = $("explain-all").checked ? "all" : "stages";
  const topK = Math.min(5, state.model ? state.model.num_classes : 5);
  const form = new FormData();
  form.append("file", state.image, state.imageName);
  try {
    const body = await post(`classify?${asked.query}&explain=${explain}&top_k=${topK}`, form);
    showAnswer(body);
    const truth = state.truth ? ` (true label: ${state.truth})` : "";
    $("status").textContent = `${state.imageName}${truth} at ${asked.text(body.requested_threshold)}`;
    if (asked.target != null) $("target-picked").textContent = `picks threshold ${body.requested_threshold.toFixed(2)}`;
  } catch (error) {
    $("answer").hidden = true;
    if (asked.target != null) $("target-picked").textContent = "no threshold picked (the error is under 3. What it thought)";
    $("status").textContent = String(error.message || error);
    $("status").className = "error";
  } finally {
    finish();
  }
}

// What the person asked for: a threshold, or (when the checkpoint has a calibration profile) a
// target accuracy, for which the server picks the threshold (the one cheapest-threshold rule lives
// there). null when the target box holds no number.
function askedFor() {
  if (!$("mode-target").checked) {
    const threshold = Number($("threshold").value);
    return { query: `threshold=${threshold}`, target: null, text: () => `threshold ${threshold.toFixed(2)}` };
  }
  const raw = $("target").value.trim();
  const target = Number(raw);
  if (raw === "" || !Number.isFinite(target)) return null;
  return {
    query: `target_accuracy=${target}`, target,
    text: (picked) => `target accuracy ${target.toFixed(3)}` + (picked == null ? "" : `: threshold ${picked.toFixed(2)}`),
  };
}

function finish(message) {
  if (message) {
    $("answer").hidden = true;
    $("status").textContent = message;
    $("status").className = "error";
  }
  state.busy = false;
  $("result").removeAttribute("aria-busy");
  if (state.again) {
    state.again = false;
    classify();
  }
}

function showAnswer(body) {
  const stages = state.model.stages;
  const last = stages.length - 1;
  const explained = body.explain.stages;
  $("status").className = "muted";
  $("label").textContent = body.label;
  $("exit-stage").textContent = body.exit_stage; // numbered from 0, as in the API
  $("last-stage").textContent = last;
  const exitGmacs = explained[body.exit_stage].exit_gmacs;
  const full = body.explain.full_gmacs;
  let compute = `${fmtGmacs(exitGmacs)} of ${fmtGmacs(full)} GMACs, ${Math.round(100 * (1 - exitGmacs / full))} % saved`;
  if (body.stages_run > body.exit_stage + 1) compute += ` (this request ran every stage to show them: ${fmtGmacs(body.gmacs)} GMACs)`;
  $("compute").textContent = compute;
  $("degraded").hidden = !body.degraded;
  $("degraded").textContent = body.degraded ?
    `Degraded: under load the server answered at threshold ${body.threshold.toFixed(2)} instead of ` +
    `${body.requested_threshold.toFixed(2)} to keep its latency goal.` : "";
  $("changed").textContent = changedLine(body, last);
  const cards = stages.map((stage, s) => stageCard(stage, s, body, explained[s]));
  $("stages").replaceChildren(...cards);
  const t = body.timings;
  $("timings").textContent = `queue ${t.queue_ms} ms · compute ${t.compute_ms} ms · total ${t.total_ms} ms (server side)`;
  $("answer").hidden = false;
}

function changedLine(body, last) {
  const explained = body.explain.stages;
  if (body.exit_stage === last) return "It needed every stage: no stage before the last reached the threshold.";
  if (explained.length <= last) return "Tick the explain=all box to see what the later stages would have said.";
  const final = explained[last].top_k[0].label;
  if (final === body.label) return `Stage ${last} would have said ${final} too: stopping early kept the answer.`;
  return `Stage ${last} would have said ${final}: stopping early changed the answer.`;
}

function stageCard(stage, s, body, explained) {
  const card = el("div", { class: "stage", id: `stage-${s}`, "data-stage": s });
  const title = el("h3", {}, `Stage ${s}`, el("span", { class: "muted" }, `${stage.heads} heads per layer · ${fmtGmacs(stage.exit_gmacs)} GMACs to here`));
  card.append(title);
  if (!explained) {
    card.classList.add("skipped");
    card.append(el("p", {}, `Not run: stage ${body.exit_stage} was confident enough.`));
    return card;
  }
  if (s === body.exit_stage) {
    card.classList.add("exit");
    title.append(el("span", { class: "badge" }, "left here"));
  } else if (s > body.exit_stage) {
    card.classList.add("after");
    title.append(el("span", { class: "badge after" }, "would have said (explain=all)"));
  }
  const threshold = body.threshold;
  const meets = explained.confidence >= threshold;
  card.append(
    el("div", { class: "conf", title: "confidence against the threshold" },
      el("div", { class: "fill", style: `width:${100 * explained.confidence}%` }),
      el("div", { class: "mark", style: `left:calc(${100 * threshold}% - 1px)` })),
    el("div", { class: "conf-line" },
      `confidence ${explained.confidence.toFixed(3)} ${meets ? "≥" : "<"} threshold ${threshold.toFixed(2)}`),
  );
  const bars = el("div", { class: "bars" });
  for (const c of explained.top_k) {
    bars.append(el("span", {}, c.label), el("div", { class: "bar", style: `width:${100 * c.probability}%` }),
      el("span", { class: "p" }, pct(c.probability)));
  }
  card.append(bars);
  return card;
}

// ------------------------------------------------------------------------------ the live panel

async function refreshLive() {
  try {
    const live = await (await fetch("v1/live")).json();
    showLive(live);
    if (live.token_required && !state.token) askForToken("");
  } catch (error) {
    $("live-window").textContent = "(server unreachable)";
  }
  setTimeout(refreshLive, LIVE_EVERY_MS);
}

function showLive(live) {
  $("live-window").textContent = live.window_s >= 290 ? "(last 5 min)" : `(last ${Math.round(live.window_s)} s)`;
  const segments = live.exits.filter((e) => e.share).map((e) =>
    el("div", { style: `width:${100 * e.share}%;background:var(--stage${e.stage % 4})`, title: `stage ${e.stage}: ${e.count}` },
      `stage ${e.stage}: ${pct(e.share)}`));
  $("live-exits").replaceChildren(...segments);
  $("live-rps").textContent = live.requests_per_s.toFixed(2);
  $("live-p50").textContent = live.latency_ms.p50 == null ? "–" : `${live.latency_ms.p50} ms`;
  $("live-p99").textContent = live.latency_ms.p99 == null ? "–" : `${live.latency_ms.p99} ms`;
  $("live-saved").textContent = live.gmacs_per_request == null ? "–" : pct(1 - live.gmacs_per_request / live.full_gmacs);
}

// ------------------------------------------------------------------------------ many images

async function classifyMany(files) {
  const images = files.filter((f) => IMAGE_NAME.test(f.name));
  const asked = askedFor();
  if (!asked) {
    $("batch-status").textContent = "Enter a target accuracy between 0 and 1.";
    $("batch-status").className = "error";
    return;
  }
  const results = [];
  $("batch-grid").replaceChildren();
  for (let i = 0; i < images.length; i += BATCH_CHUNK) {
    $("batch-status").textContent = `classifying ${i} / ${images.length}…`;
    const chunk = images.slice(i, i + BATCH_CHUNK);
    const form = new FormData();
    for (const f of chunk) form.append("files", f.blob, f.name);
    try {
      const body = await post(`classify/batch?${asked.query}`, form);
      body.results.forEach((r, j) => results.push({ ...chunk[j], ...r }));
    } catch (error) {
      $("batch-status").textContent = String(error.message || error);
      $("batch-status").className = "error";
      return;
    }
  }
  const ok = results.find((r) => r.result);
  showBatch(results, asked.text(ok ? ok.result.requested_threshold : null));
}

function showBatch(results, asked) {
  const last = state.model.stages.length - 1;
  const first = (r) => (r.result ? r.result.stage_confidences[0] : -1);
  results.sort((a, b) => first(b) - first(a));
  const early = results.filter((r) => r.result && r.result.exit_stage < last).length;
  $("batch-status").className = "muted";
  $("batch-status").textContent =
    `${results.length} images at ${asked}, most confident first: ${early} left early (green)`;
  const tiles = results.map((r) => {
    const img = el("img", { alt: r.name, src: URL.createObjectURL(r.blob) });
    if (!r.result) return el("div", { class: "tile failed", title: r.error.message }, img, el("div", { class: "name" }, r.name), el("div", {}, r.error.reason));
    const res = r.result;
    return el("div", { class: `tile${res.exit_stage < last ? " early" : ""}`, title: r.name, "data-exit-stage": res.exit_stage },
      img, el("div", { class: "name" }, res.label),
      el("div", { class: "muted" }, `conf₀ ${first(r).toFixed(2)} · stage ${res.exit_stage}`));
  });
  $("batch-grid").replaceChildren(...tiles);
}

// ------------------------------------------------------------------------------ wiring

async function loadModel() {
  state.model = await (await fetch("v1/model")).json();
  const m = state.model;
  const heads = m.stages.map((s) => s.heads).join(", ");
  $("model-line").textContent = `${m.checkpoint}: ${m.stages.length} stages (heads ${heads}), full model ` +
    `${fmtGmacs(m.stages[m.stages.length - 1].exit_gmacs)} GMACs, ${m.num_classes} classes. ${m.domain}`;
  $("threshold").value = m.default_threshold;
  $("threshold-value").textContent = Number(m.default_threshold).toFixed(2);
  setUpTarget(m);
}

// The target mode spans the accuracies the checkpoint's calibration profile reaches; without a
// profile the server answers a target with 422, so the mode is off and the page says why.
function setUpTarget(m) {
  const rows = (m.calibration && m.calibration.rows || []).filter((r) => r.accuracy != null);
  if (!rows.length) {
    $("mode-target").disabled = true;
    $("target-unavailable").hidden = false;
    $("target-unavailable").textContent = `A target accuracy is unavailable: the checkpoint ${m.checkpoint} has ` +
      "no calibration profile (thinkingvit eval --write-calibration writes one).";
    return;
  }
  const accuracies = rows.map((r) => r.accuracy);
  const low = Math.ceil(1000 * Math.min(...accuracies) - 1e-9) / 1000; // 3 decimals inside the profile
  const high = Math.floor(1000 * Math.max(...accuracies) + 1e-9) / 1000;
  const atDefault = rows.find((r) => r.threshold === m.default_threshold);
  const start = Math.min(high, Math.max(low, Math.floor(1000 * (atDefault ? atDefault.accuracy : high)) / 1000));
  for (const id of ["target-slider", "target"]) $(id).value = start.toFixed(3);
  $("target-slider").min = low.toFixed(3);
  $("target-slider").max = high.toFixed(3);
  const split = m.calibration.split ? ` on ${m.calibration.split}` : "";
  $("target-range").textContent = `The calibration profile${split} reaches accuracies ${low.toFixed(3)} to ` +
    `${high.toFixed(3)}; the server picks the cheapest calibrated threshold reaching the target (a higher one is refused).`;
}

function showMode() {
  const target = $("mode-target").checked;
  $("threshold-box").hidden = target;
  $("target-box").hidden = !target;
  classify();
}

async function loadSamples() {
  const { samples } = await (await fetch("page/samples/samples.json")).json();
  const buttons = samples.map((s) => {
    const button = el("button", { class: `sample ${s.kind}`, type: "button", "data-file": s.file,
      title: `${s.label}: stage-0 confidence ${s.first_stage_confidence} (${s.kind})` },
      el("img", { src: `page/samples/${s.file}`, alt: `${s.label} (${s.kind})` }), el("span", { class: "kind" }, s.kind));
    button.addEventListener("click", async () => {
      document.querySelectorAll(".sample.selected").forEach((b) => b.classList.remove("selected"));
      button.classList.add("selected");
      setImage(await (await fetch(`page/samples/${s.file}`)).blob(), s.file, s.label);
    });
    return button;
  });
  $("samples").replaceChildren(...buttons);
}

function firstImage(fileList) {
  return Array.from(fileList || []).find((f) => f.type.startsWith("image/") || IMAGE_NAME.test(f.name));
}

function wire() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = firstImage(e.dataTransfer.files);
    if (file) setImage(file, file.name);
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.files);
    if (file) setImage(file, file.name || "pasted.png");
  });
  $("file-input").addEventListener("change", (e) => {
    const file = firstImage(e.target.files);
    if (file) setImage(file, file.name);
  });
  $("threshold").addEventListener("input", (e) => {
    $("threshold-value").textContent = Number(e.target.value).toFixed(2);
    classify();
  });
  $("mode-threshold").addEventListener("change", showMode);
  $("mode-target").addEventListener("change", showMode);
  $("target-slider").addEventListener("input", (e) => {
    $("target").value = e.target.value;
    classify();
  });
  $("target").addEventListener("input", (e) => {
    if (e.target.value.trim() !== "") $("target-slider").value = e.target.value;
    classify();
  });
  $("explain-all").addEventListener("change", classify);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim() || null;
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token-input").value = "";
    $("token-box").hidden = Boolean(state.token); // no token given: keep asking
    $("token-status").textContent = "";
    classify();
  });
  const many = (files) => classifyMany(Array.from(files).map((f) => ({ name: f.webkitRelativePath || f.name, blob: f })));
  $("folder-input").addEventListener("change", (e) => many(e.target.files));
  $("files-input").addEventListener("change", (e) => many(e.target.files));
  $("zip-input").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      classifyMany(await readZip(await file.arrayBuffer()));
    } catch (error) {
      $("batch-status").textContent = String(error.message || error);
      $("batch-status").className = "error";
    }
  });
}

async function main() {
  wire();
  await loadModel();
  await loadSamples();
  refreshLive();
  document.body.dataset.ready = "true"; // the browser tests wait for this
}

main().catch((error) => {
  $("model-line").textContent = `The page could not start: ${error.message || error}`;
  $("model-line").className = "error";
});
