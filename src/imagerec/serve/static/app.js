// The imagerec web page: no framework, no external assets; everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== "") node.textContent = text;
  return node;
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function selected() {
  const value = $("model-select").value;
  return models.find((m) => `${m.name}@${m.version}` === value) || models.find((m) => m.default);
}

function fmt(v) {
  return typeof v === "number" ? (Math.abs(v) <= 1 ? (v * 100).toFixed(2) + "%" : String(Math.round(v * 1000) / 1000)) : String(v);
}

function renderCard(m) {
  const card = $("card");
  card.replaceChildren();
  if (!m) { card.append(el("p", { class: "small" }, "No model loaded.")); return; }
  card.append(el("p", {}, `${m.name} · version ${m.version}${m.default ? " (default)" : ""}`));
  if (m.architecture) card.append(el("p", { class: "small" }, `architecture ${m.architecture}` + (m.num_params ? `, ${m.num_params.toLocaleString()} parameters` : "")));
  card.append(el("h3", {}, `Classes (${m.num_classes})`));
  const chips = el("div", { class: "chips", id: "classes" });
  for (const c of m.classes) chips.append(el("span", { class: "chip" }, c));
  card.append(chips);
  const splits = ["val", "test"].filter((s) => m.metrics && m.metrics[s]);
  if (splits.length) {
    card.append(el("h3", {}, "Evaluation"));
    const table = el("table", { id: "metrics" });
    const head = el("tr");
    head.append(el("th", {}, "metric"));
    for (const s of splits) head.append(el("th", {}, s));
    table.append(head);
    const keys = ["accuracy", "top5", "macro_f1", "balanced_accuracy", "loss", "ece", "num_samples"];
    for (const k of keys.filter((k) => splits.some((s) => k in m.metrics[s]))) {
      const row = el("tr");
      row.append(el("td", {}, k));
      for (const s of splits) row.append(el("td", { class: "num" }, k in m.metrics[s] ? (k === "num_samples" || k === "loss" ? String(Math.round(m.metrics[s][k] * 1000) / 1000) : fmt(m.metrics[s][k])) : "–"));
      table.append(row);
    }
    card.append(table);
  } else {
    card.append(el("p", { class: "small" }, "No evaluation metrics were saved with this model."));
  }
  card.append(el("h3", {}, "Preprocessing"));
  const pre = el("table", { id: "preprocessing" });
  for (const [k, v] of Object.entries(m.preprocessing || {})) {
    const row = el("tr");
    row.append(el("td", {}, k), el("td", {}, Array.isArray(v) ? (v.length ? v.join(", ") : "–") : String(v)));
    pre.append(row);
  }
  card.append(pre);
}

async function loadModels() {
  try {
    const res = await fetch("/v1/models");
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
    models = body.models;
    const select = $("model-select");
    select.replaceChildren();
    for (const m of models) {
      const opt = el("option", { value: `${m.name}@${m.version}` }, `${m.name} v${m.version}${m.default ? " (default)" : ""}`);
      if (m.default) opt.selected = true;
      select.append(opt);
    }
    renderCard(selected());
  } catch (e) {
    $("card").replaceChildren(el("p", { class: "small" }, "Could not load the model list: " + e.message));
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function classify(file) {
  if (!file) return;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").textContent = file.name;
  $("result").hidden = true;
  setStatus("Classifying…");
  const m = selected();
  const url = m && !m.default
    ? `/v1/models/${encodeURIComponent(m.name)}/versions/${encodeURIComponent(m.version)}/predict?top_k=5`
    : "/v1/predict?top_k=5";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const started = performance.now();
    const res = await fetch(url, { method: "POST", body: form, headers: headers() });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
    const p = body.predictions[0];
    $("predicted-label").textContent = p.label;
    $("predicted-score").textContent = `(${(p.score * 100).toFixed(1)}%)`;
    $("image-sha").textContent = p.sha256;
    const list = $("topk");
    list.replaceChildren();
    for (const t of p.topk) {
      const li = el("li");
      const bar = el("div", { class: "bar" });
      const fill = el("span");
      fill.style.width = `${Math.max(0.5, t.score * 100).toFixed(1)}%`;
      bar.append(fill);
      li.append(el("span", {}, t.label), bar, el("span", { class: "num" }, `${(t.score * 100).toFixed(1)}%`));
      list.append(li);
    }
    $("result").hidden = false;
    setStatus(`${body.model} v${body.version} · ${Math.round(performance.now() - started)} ms`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function setup() {
  const zone = $("dropzone");
  $("file-input").addEventListener("change", (e) => classify(e.target.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  $("model-select").addEventListener("change", () => renderCard(selected()));
  loadModels();
}

document.addEventListener("DOMContentLoaded", setup);
