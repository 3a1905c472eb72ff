// The national dashboard: reads the aggregator with a national viewer key and refreshes every
// few seconds. The key comes from the URL fragment (#key=..., never sent to a server) or the
// form, and stays in this tab's session storage. Every figure shows which cells it covers.
"use strict";

const params = new URLSearchParams(location.hash.slice(1));
const state = {
  key: params.get("key") || sessionStorage.getItem("iiot-national-key") || "",
  interval: Number(params.get("interval") || 5) * 1000,
  refreshed: 0,
};
if (params.get("key")) {
  sessionStorage.setItem("iiot-national-key", state.key);
  history.replaceState(null, "", location.pathname);
}

const $ = (selector) => document.querySelector(selector);
const number = (n) => (n === null || n === undefined ? "-" : Math.round(n).toLocaleString("en"));
const age = (s) => (s === null || s === undefined ? "never" : `${Math.round(s)} s`);

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${state.key}` } });
  if (response.status === 401) throw new Error("unauthorized");
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function fill(tbody, rows, columns, testid) {
  tbody.replaceChildren();
  for (const r of rows) {
    const row = tbody.insertRow();
    if (testid) row.dataset.testid = testid(r);
    for (const [value, numeric] of columns(r)) {
      const td = row.insertCell();
      td.textContent = value;
      if (numeric) td.className = "n";
    }
  }
}

function showTotals(t) {
  const c = t.coverage;
  const stale = c.stale_cells.map((s) => `${s.cell} (${age(s.age_seconds)})`).join(", ");
  $("[data-testid=coverage]").textContent =
    `${c.cells_covered} of ${c.cells_registered} cells counted; oldest snapshot ${age(c.oldest_snapshot_age_seconds)}` +
    (stale ? `; stale: ${stale}` : "; none stale");
  $("[data-testid=connected]").textContent = number(t.totals.connected);
  $("[data-testid=registered]").textContent = number(t.totals.registered);
  $("[data-testid=active24]").textContent = number(t.totals.active_24h);
  $("[data-testid=active30]").textContent = number(t.totals.active_30d);
  const d = t.distinct;
  $("[data-testid=distinct]").textContent = number(d.connected_devices);
  $("[data-testid=distinct-bounds]").textContent =
    `connected, each device once (${number(d.lower_bound)} to ${number(d.upper_bound)}, ${Math.round(d.confidence * 1000) / 10} %)`;
  $("[data-testid=distinct-method]").textContent =
    `${d.sketch.name}, lg_k ${d.sketch.lg_k ?? "-"}, ${d.sketch.target ?? "-"}: ${d.method}`;
  $("#stale").hidden = t.stale.length === 0;
  fill($("[data-testid=stale-cells] tbody"), t.stale, (s) => [
    [s.cell], [age(s.age_seconds), true], [number(s.platforms), true],
    [number(s.connected), true], [number(s.registered), true],
  ], (s) => `stale-${s.cell}`);
}

function showChart(samples) {
  const svg = $("#chart");
  const points = samples.map((s) => [Date.parse(s.at), s.connected]);
  svg.dataset.points = String(points.length);
  if (points.length === 0) return svg.replaceChildren();
  const [t0, t1] = [points[0][0], points[points.length - 1][0] || points[0][0] + 1];
  const top = Math.max(1, ...points.map((p) => p[1]));
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2a6");
  line.setAttribute("points", points.map(([t, v]) =>
    `${((t - t0) / Math.max(1, t1 - t0)) * 600},${150 - (v / top) * 140}`).join(" "));
  svg.replaceChildren(line);
  svg.dataset.last = String(points[points.length - 1][1]);
}

async function showGroups() {
  const box = $("#groups");
  const tables = [];
  for (const dimension of ["tier", "type", "province", "industry"]) {
    const answer = await api(`/national/by/${dimension}`);
    const table = document.createElement("table");
    table.dataset.testid = `by-${dimension}`;
    const head = table.createTHead().insertRow();
    for (const h of [dimension, "platforms", "connected", "registered"]) {
      const th = document.createElement("th");
      th.textContent = h;
      head.append(th);
    }
    fill(table.createTBody(), answer.rows, (r) => [
      [r.name ? `${r.key} ${r.name}` : r.key], [number(r.platforms), true],
      [number(r.connected), true], [number(r.registered), true],
    ], (r) => `${dimension}-${r.key}`);
    tables.push(table);
  }
  box.replaceChildren(...tables);
}

async function refresh() {
  try {
    const [totals, cells, platforms, history] = await Promise.all([
      api("/national/totals"), api("/national/cells"), api("/national/platforms"),
      api("/national/history"),
    ]);
    $("#login").hidden = true;
    $("#main").hidden = false;
    showTotals(totals);
    fill($("[data-testid=cells] tbody"), cells.cells, (c) => [
      [c.cell], [c.status], [age(c.age_seconds), true], [number(c.sequence), true],
      [number(c.platforms), true], [number(c.connected), true], [c.definitions_version || "-"],
    ], (c) => `cell-${c.cell}`);
    fill($("[data-testid=platforms] tbody"), platforms.platforms, (p) => [
      [p.platform], [p.cell], [p.moving_to ? `moving to ${p.moving_to}` : p.status], [p.tier],
      [p.region], [number(p.connected), true], [number(p.registered), true],
    ], (p) => `platform-${p.platform}`);
    showChart(history.samples);
    await showGroups();
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    state.refreshed += 1;
    document.body.dataset.refreshed = String(state.refreshed);
  } catch (error) {
    if (error.message === "unauthorized") {
      sessionStorage.removeItem("iiot-national-key");
      state.key = "";
      $("#main").hidden = true;
      $("#login").hidden = false;
      $("#status").textContent = "a national viewer key is needed";
      return;
    }
    $("#status").textContent = `error: ${error.message}`;
  }
  setTimeout(refresh, state.interval);
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("#key").value;
  sessionStorage.setItem("iiot-national-key", state.key);
  refresh();
});
$("#forget").addEventListener("click", () => {
  sessionStorage.removeItem("iiot-national-key");
  location.reload();
});
if (state.key) refresh();
else {
  $("#login").hidden = false;
  $("#status").textContent = "a national viewer key is needed";
}
