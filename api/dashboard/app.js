// The operator dashboard: reads the API with the operator's key and refreshes every few
// seconds. No libraries: the chart is an SVG polyline. The key comes from the URL fragment
// (#key=..., never sent to a server) or the login form, and stays in this tab's session storage.
"use strict";

const params = new URLSearchParams(location.hash.slice(1));
const state = {
  key: params.get("key") || sessionStorage.getItem("iiot-key") || "",
  interval: Number(params.get("interval") || 5) * 1000,
  platform: null, // the platform shown in detail
  live: [], // [time ms, connected] of the selected platform, appended at each refresh
  grouping: "province", // the penetration view: per province or industry, or a province's prefectures
  province: null, // the province drilled into
  sort: "platform", // the platform indicators' sort field and order
  descending: false,
  regionNames: null, // GB/T 2260 code -> name, read once
};
if (params.get("key")) {
  sessionStorage.setItem("iiot-key", state.key);
  history.replaceState(null, "", location.pathname); // the key leaves the address bar
}

const $ = (selector) => document.querySelector(selector);
const number = (n) => (n === null || n === undefined ? "-" : n.toLocaleString("en"));

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${state.key}` } });
  if (response.status === 401) throw new Error("unauthorized");
  if (!response.ok) return { status: response.status };
  return { status: 200, body: await response.json() };
}

function cell(row, text, numeric) {
  const td = row.insertCell();
  td.textContent = text;
  if (numeric) td.className = "n";
  return td;
}

async function refreshNational() {
  const national = await api("/counts/national");
  $("#national").hidden = national.status !== 200;
  if (national.status === 200) {
    const n = national.body;
    $("[data-testid=national-connected]").textContent = number(n.connected);
    $("[data-testid=national-registered]").textContent = number(n.registered);
    $("[data-testid=national-active24]").textContent = number(n.active_24h);
    $("[data-testid=national-distinct]").textContent = number(n.distinct && n.distinct.connected);
    $("#definitions").textContent = `Definitions ${n.definitions_version}: connected = ${n.definitions.connected}`;
  }
  const groups = $("#group-tables");
  let shown = false;
  groups.replaceChildren();
  for (const dimension of ["tier", "type", "region", "industry"]) {
    const grouped = await api(`/counts/by/${dimension}`);
    if (grouped.status !== 200) continue;
    shown = true;
    const table = document.createElement("table");
    table.dataset.testid = `group-${dimension}`;
    table.createTHead().insertRow().append(
      ...[dimension, "platforms", "connected", "registered"].map((h) => {
        const th = document.createElement("th");
        th.textContent = h;
        return th;
      }),
    );
    const body = table.createTBody();
    for (const g of grouped.body.groups) {
      const row = body.insertRow();
      const name = dimension === "region" && state.regionNames ? state.regionNames[g.key] : null;
      cell(row, name ? `${g.key} ${name}` : g.key);
      cell(row, number(g.platforms), true);
      cell(row, number(g.connected), true);
      cell(row, number(g.registered), true);
    }
    groups.append(table);
  }
  $("#groups").hidden = !shown;
}

const percent = (rate) => (rate === null || rate === undefined ? "-" : `${(rate * 100).toFixed(1)}%`);

async function refreshPenetration() {
  if (state.regionNames === null) {
    const regions = await api("/classification/regions");
    state.regionNames = {};
    if (regions.status === 200) for (const r of regions.body) state.regionNames[r.code] = r.name;
  }
  const national = await api("/penetration");
  $("#penetration").hidden = national.status !== 200;
  if (national.status === 200) {
    const n = national.body;
    const row = n.rows[0];
    $("[data-testid=penetration-served]").textContent = percent(row.served_rate);
    $("[data-testid=penetration-served-of]").textContent =
      `served: ${number(row.served)} / ${number(row.total)} enterprises above designated size`;
    $("[data-testid=penetration-connected]").textContent = percent(row.connected_30d_rate);
    $("[data-testid=penetration-connected-of]").textContent =
      `with a device connected in 30 days: ${number(row.connected_30d)} / ${number(row.total)}`;
    $("[data-testid=penetration-target]").textContent = percent(n.target_2028);
    $("#penetration-totals").textContent = n.totals
      ? `(totals ${n.totals.year}: ${n.totals.source}; computed ${n.as_of ? new Date(n.as_of).toLocaleString() : "not yet"})`
      : "(no official totals imported)";
    $("#penetration-definitions").textContent =
      `Definitions ${n.definitions_version}: served = ${n.definitions.served} 30 d = ${n.definitions.connected_30d} ${n.disputed} enterprises are declared differently by their platforms.`;
    const path = state.grouping === "prefecture"
      ? `/penetration/by/prefecture?region=${state.province}`
      : `/penetration/by/${state.grouping}${state.grouping === "industry" ? "?level=section" : ""}`;
    const grouped = await api(path);
    if (grouped.status === 200) drawPenetration(grouped.body.rows);
  }
  const indicators = await api(`/penetration/indicators?sort=${state.sort}&descending=${state.descending}`);
  if (indicators.status === 200) {
    const body = $("[data-testid=indicators] tbody");
    body.replaceChildren();
    for (const i of indicators.body.items) {
      const row = body.insertRow();
      row.dataset.testid = `indicators-row-${i.platform}`;
      cell(row, i.platform);
      cell(row, i.tier);
      cell(row, `${i.region.code} ${i.region.name || ""}`);
      cell(row, i.industry ? `${i.industry.code} ${i.industry.name}` : `${i.industry_text} (not mapped)`);
      cell(row, number(i.devices_connected), true);
      cell(row, number(i.enterprises), true);
      cell(row, number(i.enterprises_above_size), true);
      cell(row, number(i.enterprises_connected_30d), true);
      cell(row, number(i.industries), true);
      cell(row, number(i.provinces), true);
      cell(row, number(i.prefectures), true);
      cell(row, i.devices_per_enterprise === null ? "-" : i.devices_per_enterprise.toFixed(1), true);
    }
  }
}

function drawPenetration(rows) {
  $("#penetration-caption").textContent = state.grouping === "prefecture"
    ? `prefectures of ${state.regionNames[state.province] || state.province}`
    : "";
  $("[data-testid=penetration-back]").hidden = state.grouping !== "prefecture";
  for (const button of document.querySelectorAll("#penetration button[data-grouping]")) {
    button.classList.toggle("active", button.dataset.grouping === state.grouping);
  }
  const body = $("[data-testid=penetration-rows] tbody");
  body.replaceChildren();
  for (const r of rows) {
    const row = body.insertRow();
    row.dataset.testid = `penetration-row-${r.key}`;
    row.dataset.served = r.served;
    row.dataset.total = r.total === null ? "" : r.total;
    cell(row, r.key);
    cell(row, r.name || "");
    cell(row, number(r.served), true);
    cell(row, number(r.connected_30d), true);
    cell(row, number(r.total), true);
    cell(row, percent(r.served_rate), true);
    cell(row, percent(r.connected_30d_rate), true);
    if (state.grouping === "province") {
      row.onclick = () => {
        state.grouping = "prefecture";
        state.province = r.key;
        refreshPenetration();
      };
    }
  }
  // Bars per row: the served rate, the 30-day rate under it, and the 2028 target as a line.
  const svg = $("#penetration-chart");
  svg.replaceChildren();
  const height = 20 + rows.length * 24;
  svg.setAttribute("height", String(height));
  const scale = (rate) => 120 + Math.min(rate || 0, 1) * 280;
  const add = (tag, attributes, text) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text) node.textContent = text;
    svg.append(node);
    return node;
  };
  rows.forEach((r, n) => {
    const y = 10 + n * 24;
    add("text", { x: 0, y: y + 12 }, (r.name || r.key).slice(0, 12));
    add("rect", { class: "served", x: 120, y, width: scale(r.served_rate) - 120, height: 10 });
    add("rect", { class: "connected", x: 120, y: y + 11, width: scale(r.connected_30d_rate) - 120, height: 8 });
  });
  add("line", { class: "target", x1: scale(0.55), x2: scale(0.55), y1: 0, y2: height });
  add("text", { x: scale(0.55) + 3, y: height - 2 }, "55%");
  svg.dataset.bars = String(rows.length);
}

for (const button of document.querySelectorAll("#penetration button[data-grouping]")) {
  button.onclick = () => {
    state.grouping = button.dataset.grouping;
    refreshPenetration();
  };
}
$("[data-testid=penetration-back]").onclick = () => {
  state.grouping = "province";
  refreshPenetration();
};
for (const th of document.querySelectorAll("[data-testid=indicators] th[data-sort]")) {
  th.onclick = () => {
    state.descending = state.sort === th.dataset.sort ? !state.descending : th.dataset.sort !== "platform";
    state.sort = th.dataset.sort;
    refreshPenetration();
  };
}

async function refreshPlatforms() {
  const rows = [];
  let after = "";
  for (;;) {
    const page = await api(`/counts/platforms?limit=1000${after ? `&after=${after}` : ""}`);
    if (page.status !== 200) break;
    rows.push(...page.body.items);
    if (!page.body.next_after) break;
    after = page.body.next_after;
  }
  const body = $("[data-testid=platforms] tbody");
  body.replaceChildren();
  for (const p of rows) {
    const row = body.insertRow();
    row.dataset.testid = `platform-row-${p.platform}`;
    row.dataset.connected = p.connected;
    row.dataset.registered = p.registered;
    cell(row, p.platform);
    cell(row, number(p.connected), true);
    cell(row, number(p.registered), true);
    cell(row, number(p.active_24h), true);
    cell(row, number(p.active_30d), true);
    row.onclick = () => selectPlatform(p.platform);
  }
  if (!state.platform && rows.length) await selectPlatform(rows[0].platform, false);
  const current = rows.find((p) => p.platform === state.platform);
  if (current) state.live.push([Date.now(), current.connected]);
}

async function selectPlatform(platform, refresh = true) {
  if (platform !== state.platform) {
    state.platform = platform;
    state.live = [];
    $("#device").hidden = true;
  }
  $("#platform").hidden = false;
  $("#platform-name").textContent = platform;
  if (refresh) await refreshPlatformDetail();
}

async function refreshPlatformDetail() {
  const p = state.platform;
  if (!p) return;
  const start = new Date(Date.now() - 3600 * 1000).toISOString();
  const history = await api(`/platforms/${p}/devices/count/history?start=${encodeURIComponent(start)}&bucket_seconds=60`);
  const sampled = history.status === 200
    ? history.body.buckets.map((b) => [Date.parse(b.start), b.connected_last])
    : [];
  drawChart([...sampled, ...state.live]);

  const recent = await api(`/platforms/${p}/ingest/recent?minutes=60`);
  if (recent.status === 200) {
    const minutes = recent.body.minutes;
    const last = minutes[minutes.length - 1] || { points: 0, messages: 0 };
    $("[data-testid=rate-points]").textContent = number(last.points);
    $("[data-testid=rate-messages]").textContent = number(last.messages);
    $("[data-testid=dead-letters]").textContent = number(
      minutes.reduce((sum, m) => sum + m.refused_messages, 0),
    );
  }

  const devices = await api(`/platforms/${p}/devices?limit=50`);
  const body = $("[data-testid=devices] tbody");
  body.replaceChildren();
  if (devices.status === 200) {
    for (const d of devices.body.items) {
      const row = body.insertRow();
      row.dataset.testid = `device-row-${d.device_id}`;
      cell(row, d.device_id);
      cell(row, d.connected ? "connected" : d.state);
      cell(row, d.gateway || "");
      cell(row, d.last_seen ? new Date(d.last_seen).toLocaleString() : "never");
      row.onclick = () => showDevice(d.device_id);
    }
  }
}

function drawChart(points) {
  const svg = $("#chart");
  svg.replaceChildren();
  svg.dataset.points = points.length;
  svg.dataset.last = points.length ? points[points.length - 1][1] : "";
  if (!points.length) return;
  const times = points.map((p) => p[0]);
  const values = points.map((p) => p[1]);
  const [t0, t1] = [Math.min(...times), Math.max(...times)];
  const top = Math.max(1, ...values);
  const x = (t) => (t1 === t0 ? 600 : ((t - t0) / (t1 - t0)) * 600);
  const y = (v) => 155 - (v / top) * 145;
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
  svg.append(line);
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", "4");
  label.setAttribute("y", "14");
  label.textContent = `max ${number(top)}, now ${number(values[values.length - 1])}`;
  svg.append(label);
}

async function showDevice(device) {
  const p = state.platform;
  const [found, events] = await Promise.all([
    api(`/platforms/${p}/devices/${encodeURIComponent(device)}`),
    api(`/platforms/${p}/devices/${encodeURIComponent(device)}/events?limit=50`),
  ]);
  $("#device").hidden = false;
  $("#device-name").textContent = device;
  const latest = $("[data-testid=latest] tbody");
  latest.replaceChildren();
  if (found.status === 200) {
    for (const v of found.body.latest) {
      const row = latest.insertRow();
      cell(row, v.metric);
      cell(row, String(v.value), true);
      cell(row, new Date(v.time).toLocaleString());
    }
  }
  const history = $("[data-testid=events] tbody");
  history.replaceChildren();
  if (events.status === 200) {
    for (const e of events.body.events) {
      const row = history.insertRow();
      cell(row, new Date(e.time).toLocaleString());
      cell(row, e.subject);
      cell(row, e.state);
      cell(row, e.cause);
    }
  }
}

// The cell whose store the figures come from: one dashboard per cell, told apart at a glance.
async function refreshCell() {
  const health = await api("/healthz");
  if (health.status !== 200) return;
  $("#cell").textContent = `cell ${health.body.cell}`;
  document.title = `iiot ${health.body.cell}: connected devices`;
}

async function refresh() {
  try {
    await refreshCell();
    await refreshPenetration();
    await refreshNational();
    await refreshPlatforms();
    await refreshPlatformDetail();
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (error) {
    if (error.message === "unauthorized") return showLogin("That key is unknown or revoked.");
    $("#status").textContent = `refresh failed: ${error.message}`;
  }
}

function showLogin(message) {
  sessionStorage.removeItem("iiot-key");
  state.key = "";
  $("#main").hidden = true;
  $("#login").hidden = false;
  $("#status").textContent = message || "an API key is needed";
}

$("#login").onsubmit = (event) => {
  event.preventDefault();
  state.key = $("#key").value.trim();
  sessionStorage.setItem("iiot-key", state.key);
  start();
};
$("#forget").onclick = () => showLogin("key forgotten");

let timer = null;
function start() {
  $("#login").hidden = true;
  $("#main").hidden = false;
  clearInterval(timer);
  refresh();
  timer = setInterval(refresh, state.interval);
}

if (state.key) start();
else showLogin();
