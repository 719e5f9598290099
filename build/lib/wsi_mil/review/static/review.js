// wsi-mil review page: one OpenSeadragon viewer, the slide from Deep Zoom tiles, the
// attention heatmap laid over it, and the top patches as a list that jumps to them.
"use strict";

const state = { slides: [], current: null, info: null, overlay: null, overlayLoaded: false,
                slideLoaded: false, opacity: 0.5, visible: true };
const viewer = OpenSeadragon({
  id: "viewer", prefixUrl: "/osd/images/", drawer: "canvas", showNavigator: true,
  navigatorPosition: "BOTTOM_RIGHT", maxZoomPixelRatio: 2, visibilityRatio: 0.5,
  animationTime: 0.6, gestureSettingsMouse: { clickToZoom: false },
  imageSmoothingEnabled: false,  // one heatmap cell = one patch: draw it as the block it is
});
window.review = { viewer, state };

const $ = (id) => document.getElementById(id);
const fmt = (v) => (typeof v === "number" ? v.toPrecision(3) : String(v));

function toViewport(x, y, w, h) {
  // OpenSeadragon's viewport coordinates: the slide's width is 1
  const W = state.info.width;
  return new OpenSeadragon.Rect(x / W, y / W, w / W, h / W);
}

async function loadSlide(id) {
  state.current = id; state.overlay = null; state.overlayLoaded = false; state.slideLoaded = false;
  $("slide-select").value = id;
  const filter = $("filter").value;
  history.replaceState(null, "", "#slide=" + encodeURIComponent(id) + (filter && filter !== "all" ? "&filter=" + filter : ""));
  const info = await (await fetch("/api/slide/" + encodeURIComponent(id))).json();
  state.info = info;
  showInfo(info);
  viewer.open(info.dzi);
  loadSlideReview(id);
}

viewer.addHandler("open", () => {
  const info = state.info;
  const slideItem = viewer.world.getItemAt(0);
  slideItem.addOnceHandler("fully-loaded-change", () => { state.slideLoaded = true; });
  const r = toViewport(info.heatmap.x, info.heatmap.y, info.heatmap.width, info.heatmap.height);
  viewer.addTiledImage({
    tileSource: { type: "image", url: info.heatmap.url, buildPyramid: false },
    x: r.x, y: r.y, width: r.width, opacity: state.visible ? state.opacity : 0,
    success: (e) => { state.overlay = e.item; e.item.addOnceHandler("fully-loaded-change", () => { state.overlayLoaded = true; }); },
  });
});

function showInfo(info) {
  const call = info.call || {};
  const banner = $("call");
  banner.textContent = call.text || "";
  banner.className = call.positive === true ? "positive" : call.positive === false ? "negative" : "";
  // the heatmap is fainter on a slide called negative (its colours rank patches within it only)
  $("opacity").value = Math.round(100 * (info.opacity ?? 0.5));
  setOpacity(info.opacity ?? 0.5);
  const probs = Object.entries(info.probability || {}).map(([k, v]) => `p(${k}) = ${fmt(v)}`).join(", ");
  $("prediction").innerHTML = "";
  const add = (cls, text) => { const d = document.createElement("div"); d.className = cls; d.textContent = text; $("prediction").appendChild(d); };
  add("pred", `prediction: ${Array.isArray(info.prediction) ? info.prediction.join(", ") || "none" : info.prediction}`);
  add("", probs);
  add("", `${info.model}, ${info.fold === "ensemble" ? "fold ensemble" : "fold " + info.fold} (${info.split}); ${info.n_patches} patches`);
  $("colourbar-gradient").style.background = `linear-gradient(to right, ${info.colour_stops.join(", ")})`;
  $("vmin").textContent = fmt(info.vmin); $("vmax").textContent = fmt(info.vmax);
  $("normalisation").textContent = info.normalisation;
  const list = $("top-list"); list.innerHTML = "";
  info.top.forEach((p, i) => {
    const li = document.createElement("li");
    li.textContent = `#${p.index} — ${fmt(p.score)} at (${Math.round(p.x)}, ${Math.round(p.y)})`;
    li.dataset.rank = i;
    li.addEventListener("click", () => goToPatch(i));
    list.appendChild(li);
  });
  const ex = Object.entries(info.exports || {});
  $("exports").innerHTML = ex.length ? "Exports: " : "";
  ex.forEach(([k, url]) => { const a = document.createElement("a"); a.href = url; a.textContent = k; a.download = "";
                             $("exports").append(a, " "); });
}

function goToPatch(i) {
  const p = state.info.top[i];
  document.querySelectorAll("#top-list li").forEach((li) => li.classList.toggle("active", Number(li.dataset.rank) === i));
  const pad = p.size * 1.5;
  viewer.viewport.fitBounds(toViewport(p.x - pad, p.y - pad, p.size + 2 * pad, p.size + 2 * pad));
  if (state.box) viewer.removeOverlay(state.box);  // (the drawn regions' overlay stays)
  const box = document.createElement("div"); box.className = "box"; state.box = box;
  viewer.addOverlay({ element: box, location: toViewport(p.x, p.y, p.size, p.size) });
  state.lastPatch = i;
}

function setOpacity(v) {
  state.opacity = v; $("opacity-value").textContent = Math.round(v * 100) + "%";
  if (state.overlay) state.overlay.setOpacity(state.visible ? v : 0);
}

function step(delta) {
  const ids = state.slides.map((s) => s.slide_id);
  const i = ids.indexOf(state.current);
  loadSlide(ids[(i + delta + ids.length) % ids.length]);
}

$("opacity").addEventListener("input", (e) => setOpacity(e.target.value / 100));
$("slide-select").addEventListener("change", (e) => loadSlide(e.target.value));
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA") return;
  if (e.key === "Escape" && state.drawing) { state.drawing = null; drawingMode(false); renderRegions(); return; }
  if (e.key === "n") step(1);
  if (e.key === "p") step(-1);
  if (e.key === "h") { state.visible = !state.visible; setOpacity(state.opacity); }
  if (e.key === "0") viewer.viewport.goHome();
});

function shown(s, filter) {
  // the run's audit marks every error (FN / FP) and the most confident correct slides (TP / TN)
  const kind = s.outcome ? s.outcome.kind : null;
  if (filter === "all") return true;
  if (filter === "errors") return kind === "FN" || kind === "FP";
  if (filter === "correct") return kind === "TP" || kind === "TN";
  return kind === filter;
}

function renderList(filter) {
  const select = $("slide-select");
  select.textContent = "";
  state.visibleSlides = state.all.filter((s) => shown(s, filter));
  state.slides = state.visibleSlides;
  for (const s of state.slides) {
    const o = document.createElement("option");
    const p = Object.values(s.probability || {})[0];
    const mark = s.call && s.call.positive === true ? "● " : "";
    const kind = s.outcome ? ` [${s.outcome.kind}]` : "";
    o.value = s.slide_id; o.textContent = `${mark}${s.slide_id}${kind} (${s.prediction}${p !== undefined ? ", p " + fmt(p) : ""})`;
    select.appendChild(o);
  }
  if (!state.slides.length) {
    const o = document.createElement("option");
    o.textContent = filter === "all" ? "no slides" : "no slide of this kind (or the run has no audit)";
    o.disabled = true; select.appendChild(o);
  }
}

$("filter").addEventListener("change", (e) => {
  renderList(e.target.value);
  if (state.slides.length) loadSlide(state.slides[0].slide_id);
});

// ---- the reviewer's verdict and drawn regions (saved in the run's review/ folder)
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = { "Tumor": "#e41a1c", "False positive": "#377eb8", "Exclude": "#984ea3" };
Object.assign(state, { review: null, regions: [], drawing: null, svg: null, regionsSaved: false });

async function loadReview() {
  state.review = await (await fetch("/api/review")).json();
  $("reviewer").textContent = `(${state.review.reviewer})`;
  for (const c of state.review.region_classes) {
    const o = document.createElement("option"); o.value = c; o.textContent = c; $("region-class").appendChild(o);
  }
}

async function loadSlideReview(id) {
  const d = await (await fetch("/api/review/" + encodeURIComponent(id))).json();
  if (state.current !== id) return;
  const v = d.verdict;
  document.querySelectorAll("input[name=verdict]").forEach((r) => { r.checked = !!v && r.value === v.verdict; });
  $("comment").value = v ? v.comment : ""; $("corrected-label").value = v ? v.corrected_label : "";
  $("verdict-status").textContent = v ? `saved ${v.verdict} at ${v.time}` : "no verdict yet";
  state.regions = d.regions.map((f) => ({ cls: f.properties.classification.name,
                                          points: f.geometry.coordinates[0].slice(0, -1) }));
  state.regionsSaved = true; state.drawing = null; drawingMode(false);
  $("region-status").textContent = d.regions.length ? `${d.regions.length} region(s) saved` : "";
  state.svg = null; renderRegions();
}

function post(kind, body) {
  return fetch(`/api/${kind}/${encodeURIComponent(state.current)}`, {
    method: "POST", headers: { "Content-Type": "application/json", "X-Review-Token": state.review.token },
    body: JSON.stringify(body) });
}

async function saveVerdict(replace) {
  const chosen = document.querySelector("input[name=verdict]:checked");
  if (!chosen) { $("verdict-status").textContent = "choose agree, disagree or uncertain first"; return; }
  const r = await post("verdict", { verdict: chosen.value, comment: $("comment").value,
                                    corrected_label: $("corrected-label").value, replace: !!replace });
  const d = await r.json();
  if (r.status === 409) {
    if (confirm(`You saved "${d.existing.verdict}" for this slide at ${d.existing.time}. Replace it? (both stay in verdicts.csv)`)) return saveVerdict(true);
    $("verdict-status").textContent = "not saved: the earlier verdict stands"; return;
  }
  $("verdict-status").textContent = r.ok ? `saved ${d.saved.verdict} at ${d.saved.time}` : `not saved: ${d.error}`;
}

async function saveRegions(replace) {
  const features = state.regions.map((g) => ({ type: "Feature", properties: { classification: { name: g.cls } },
    geometry: { type: "Polygon", coordinates: [[...g.points, g.points[0]]] } }));
  const r = await post("regions", { features, replace: !!replace });
  const d = await r.json();
  if (r.status === 409) {
    if (confirm(`${d.existing.length} region(s) were saved for this slide before. Replace them with these ${features.length}?`)) return saveRegions(true);
    $("region-status").textContent = "not saved: the earlier regions stand"; return;
  }
  state.regionsSaved = r.ok;
  $("region-status").textContent = r.ok ? `${d.saved.length} region(s) saved` : `not saved: ${d.error}`;
}

function drawingMode(on) {
  $("draw").disabled = on; $("finish").disabled = !on;
  viewer.panHorizontal = viewer.panVertical = !on;  // (clicks add points; the wheel still zooms)
}

function renderRegions() {
  if (!state.info) return;
  const W = state.info.width, H = state.info.height;
  if (!state.svg) {
    if (state.svgOverlay) viewer.removeOverlay(state.svgOverlay);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "regions-svg"); state.svg = svg; state.svgOverlay = svg;
    viewer.addOverlay({ element: svg, location: toViewport(0, 0, W, H) });
  }
  state.svg.textContent = "";
  const all = state.drawing ? [...state.regions, state.drawing] : state.regions;
  for (const g of all) {
    const el = document.createElementNS(SVG, g === state.drawing ? "polyline" : "polygon");
    el.setAttribute("points", g.points.map((p) => p.join(",")).join(" "));
    el.setAttribute("fill", g === state.drawing ? "none" : COLOURS[g.cls] || "#ff7f00"); el.setAttribute("fill-opacity", "0.25");
    el.setAttribute("stroke", COLOURS[g.cls] || "#ff7f00"); el.setAttribute("stroke-width", "2");
    el.setAttribute("vector-effect", "non-scaling-stroke");
    state.svg.appendChild(el);
  }
  const list = $("region-list"); list.textContent = "";
  state.regions.forEach((g, i) => {
    const li = document.createElement("li"); li.textContent = `${g.cls} (${g.points.length} points)`;
    const del = document.createElement("button"); del.textContent = "delete";
    del.addEventListener("click", () => { state.regions.splice(i, 1); state.regionsSaved = false; renderRegions(); });
    li.appendChild(del); list.appendChild(li);
  });
}

function finishRegion() {
  const g = state.drawing;
  state.drawing = null; drawingMode(false);
  if (g && g.points.length >= 3) { state.regions.push(g); state.regionsSaved = false;
                                   $("region-status").textContent = "not saved yet"; }
  renderRegions();
}

viewer.addHandler("canvas-click", (e) => {
  if (!state.drawing || !e.quick) return;
  e.preventDefaultAction = true;
  const p = viewer.world.getItemAt(0).viewerElementToImageCoordinates(e.position);  // (the slide: level-0 pixels)
  state.drawing.points.push([Math.round(p.x * 10) / 10, Math.round(p.y * 10) / 10]);
  renderRegions();
});
viewer.addHandler("canvas-double-click", (e) => { if (state.drawing) { e.preventDefaultAction = true; finishRegion(); } });
viewer.addHandler("open", () => { state.svg = null; renderRegions(); });
$("draw").addEventListener("click", () => { state.drawing = { cls: $("region-class").value, points: [] }; drawingMode(true); });
$("finish").addEventListener("click", finishRegion);
$("save-verdict").addEventListener("click", () => saveVerdict(false));
$("save-regions").addEventListener("click", () => saveRegions(false));
Object.assign(window.review, { saveVerdict, saveRegions, finishRegion });

(async () => {
  await loadReview();
  const data = await (await fetch("/api/slides")).json();
  state.all = data.slides;
  const m = location.hash.match(/slide=([^&]+)/);
  const f = location.hash.match(/filter=([^&]+)/);
  const filter = f ? decodeURIComponent(f[1]) : "all";
  $("filter").value = filter;
  renderList(filter);
  const wanted = m ? decodeURIComponent(m[1]) : null;
  if (state.slides.length) loadSlide(state.slides.some((s) => s.slide_id === wanted) ? wanted : state.slides[0].slide_id);
})();
