// AETHER's map page: PCA layers of the rasters, an OpenStreetMap basemap when online, the POIs,
// questions in words and "places like this" as heatmap layers, with their top-k places.
"use strict";

const state = { info: null, map: null, control: null, layers: {}, markers: null, current: null };

function $(id) { return document.getElementById(id); }

function say(text, error) {
  const m = $("message");
  m.textContent = text;
  m.className = error ? "error" : "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function tiles(url, options) {
  return L.tileLayer(url, Object.assign({ tileSize: 256, maxZoom: 20, bounds: state.info.bounds }, options));
}

async function start() {
  const info = state.info = await api("/api/info");
  $("about").textContent = `${info.name} (checkpoint ${info.checkpoint}); top ${info.top_k} places, none within ${info.nms_m} m of a better one`;
  const map = state.map = L.map("map", { preferCanvas: true, fadeAnimation: false });
  map.fitBounds(info.bounds);
  const bases = {};
  const overlays = {};
  state.layers.aether = tiles("/tiles/aether/{z}/{x}/{y}.png", { opacity: 1 }).addTo(map);
  overlays["AETHER (PCA)"] = state.layers.aether;
  if (info.layers.includes("alphaearth")) {
    overlays["AlphaEarth (PCA)"] = tiles("/tiles/alphaearth/{z}/{x}/{y}.png");
  }
  if (navigator.onLine) {  // the basemap loads only when the browser is online
    bases["OpenStreetMap"] = L.tileLayer("https://tile.openstreetmap.org/{z}/{x}/{y}.png",
      { maxZoom: 19, attribution: "&copy; OpenStreetMap contributors" });
  }
  if (info.pois > 0) {
    const pois = await api("/api/pois");
    state.markers = L.markerClusterGroup();
    L.geoJSON(pois, { onEachFeature: (f, layer) => layer.bindPopup(f.properties.text || "") })
      .eachLayer(l => state.markers.addLayer(l));
    overlays[`POIs (${info.pois})`] = state.markers;
  }
  state.control = L.control.layers(bases, overlays, { collapsed: false }).addTo(map);
  map.on("click", e => like(e.latlng));
  $("ask").addEventListener("submit", e => { e.preventDefault(); ask($("query").value); });
  document.body.dataset.ready = "true";
}

async function ask(text) {
  if (!text.trim()) { say("type a question first", true); return; }
  say("searching...");
  try { show(await api("/api/query", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }) })); }
  catch (e) { say(e.message, true); }
}

async function like(latlng) {
  say("places like this...");
  try { show(await api(`/api/like?lon=${latlng.lng}&lat=${latlng.lat}`, { method: "POST" })); }
  catch (e) { say(e.message, true); }
}

function show(query) {
  const layer = tiles(`/tiles/q/${query.id}/{z}/{x}/{y}.png`, { opacity: 0.85 });
  layer.on("load", () => { document.body.dataset.overlay = String(query.id); });
  if (state.current) state.map.removeLayer(state.current);
  layer.addTo(state.map);
  state.current = layer;
  state.control.addOverlay(layer, `q${query.id}: ${query.text}`);
  const item = document.createElement("li");
  item.textContent = `q${query.id}: ${query.text}`;
  $("queries").appendChild(item);
  legend(query);
  $("places").innerHTML = "";
  $("downloads").innerHTML = "";
  poll(query.id);
}

function legend(query) {
  $("legend").hidden = false;
  $("legend-bar").style.background = `linear-gradient(to right, ${state.info.colours.join(", ")})`;
  $("legend-low").textContent = `cosine ${query.range[0].toFixed(3)}`;
  $("legend-high").textContent = query.range[1].toFixed(3);
}

async function poll(id) {
  const query = await api(`/api/query/${id}`);
  if (query.status === "searching") { setTimeout(() => poll(id), 300); return; }
  if (query.status === "failed") { say(query.error, true); return; }
  say(`q${id}: ${query.places.length} places`);
  const list = $("places");
  list.innerHTML = "";
  for (const p of query.places) {
    const li = document.createElement("li");
    li.textContent = `${p.score.toFixed(3)}  (${p.lat.toFixed(5)}, ${p.lon.toFixed(5)})`;
    li.dataset.lon = p.lon; li.dataset.lat = p.lat; li.dataset.score = p.score;
    li.addEventListener("click", () => state.map.setView([p.lat, p.lon], Math.max(state.map.getZoom(), 17)));
    list.appendChild(li);
  }
  $("downloads").innerHTML = `<a href="/api/query/${id}/heatmap.tif" download>heatmap (GeoTIFF)</a> · ` +
    `<a href="/api/query/${id}/places.geojson" download>places (GeoJSON)</a>`;
  document.body.dataset.places = String(id);
}

start().catch(e => say(e.message, true));
