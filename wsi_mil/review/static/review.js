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
  viewer.clearOverlays();
  const box = document.createElement("div"); box.className = "box";
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
  if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") return;
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

(async () => {
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
