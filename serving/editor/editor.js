// The pix2pixHD editor: paint a label map with the dataset's classes, give objects instance ids, pick each
// object's style, render through POST /render. Plain ES modules, no build step, nothing from a CDN.
import { decodeIds, encodeIds } from "./png.js";

const $ = (id) => document.getElementById(id);
const BLANK = [[64, 128], [128, 256], [256, 512]]; // height, width: multiples every model here accepts (checked on load)
const UNDO_DEPTH = 50;

const state = {
  info: null, // GET /classes
  width: 0, height: 0,
  label: null, // Uint8Array: class ids
  inst: null, // Uint16Array: instance ids (class * 1000 + k for things, the class id for stuff)
  styles: new Map(), // instance id -> cluster index, or a feature vector (a style taken from a photo)
  sample: null, // the name of the open sample when it has a photo
  note: "", // said under the image once the next render is shown
  cls: 7, // the class the brush paints
  selected: null, // instance id picked with the object tool
  undo: [], redo: [],
  stroke: null, // the instance id of the stroke being painted
  renders: 0, imageUrl: null, rendering: false, again: false,
};

const status = (text) => { $("status").textContent = text || ""; };

async function api(path, options) {
  const r = await fetch(path, options);
  if (!r.ok) {
    let detail = `${r.status} ${r.statusText}`;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return r;
}

// ---- the map --------------------------------------------------------------------------------------------------
function thing(c) { return state.info.classes[c] && state.info.classes[c].thing; }

function newInstance(c) {
  if (!thing(c)) return c;
  let k = 0;
  for (const v of state.inst) if (Math.floor(v / 1000) === c) k = Math.max(k, v % 1000 + 1);
  return c * 1000 + k;
}

function snapshot() {
  state.undo.push({ label: state.label.slice(), inst: state.inst.slice(), styles: new Map(state.styles) });
  if (state.undo.length > UNDO_DEPTH) state.undo.shift();
  state.redo = [];
}

function restore(from, to) {
  const s = from.pop();
  if (!s) return;
  to.push({ label: state.label, inst: state.inst, styles: state.styles });
  Object.assign(state, s);
  draw();
  edited();
}

function setMap(width, height, label, inst) {
  const m = state.info.size_multiple;
  if (width % m || height % m) {
    status(`this map is ${width}x${height}; the model needs multiples of ${m}: cropped to fit`);
    const w = width - (width % m), h = height - (height % m);
    const crop = (a, T) => { const o = new T(w * h); for (let y = 0; y < h; y++) o.set(a.subarray(y * width, y * width + w), y * w); return o; };
    label = crop(label, Uint8Array); inst = crop(inst, Uint16Array); width = w; height = h;
  }
  Object.assign(state, { width, height, label, inst, styles: new Map(), selected: null, undo: [], redo: [] });
  const canvas = $("label");
  canvas.width = width; canvas.height = height;
  canvas.style.width = `${Math.min(1024, Math.max(512, width))}px`;
  $("image").style.width = canvas.style.width;
  draw();
  showObject();
  edited();
}

function blank(height, width) {
  const road = state.info.classes.findIndex((c) => c.name === "road");
  const sky = state.info.classes.findIndex((c) => c.name === "sky");
  const label = new Uint8Array(width * height).fill(road >= 0 ? road : 0);
  if (sky >= 0) label.fill(sky, 0, width * Math.floor(height / 2));
  setMap(width, height, label, Uint16Array.from(label));
}

function draw() {
  const canvas = $("label"), ctx = canvas.getContext("2d");
  const img = ctx.createImageData(state.width, state.height);
  const colours = state.info.classes.map((c) => [1, 3, 5].map((i) => parseInt(c.color.slice(i, i + 2), 16)));
  for (let i = 0; i < state.label.length; i++) {
    const rgb = colours[state.label[i]] || [255, 0, 255];
    let [r, g, b] = rgb;
    if (state.selected !== null && state.inst[i] === state.selected) { r = 255 - (255 - r) / 3; g = g / 3; b = b / 3; }
    img.data.set([r, g, b, 255], 4 * i);
  }
  // instance boundaries, so objects of one class stay apart
  for (let y = 0; y < state.height; y++) for (let x = 0; x < state.width; x++) {
    const i = y * state.width + x;
    if ((x + 1 < state.width && state.inst[i] !== state.inst[i + 1]) || (y + 1 < state.height && state.inst[i] !== state.inst[i + state.width])) {
      if (state.inst[i] >= 1000) img.data.set([255, 255, 255, 255], 4 * i);
    }
  }
  ctx.putImageData(img, 0, 0);
}

function at(event) {
  const r = $("label").getBoundingClientRect();
  const x = Math.floor(((event.clientX - r.left) / r.width) * state.width);
  const y = Math.floor(((event.clientY - r.top) / r.height) * state.height);
  return [Math.max(0, Math.min(state.width - 1, x)), Math.max(0, Math.min(state.height - 1, y))];
}

function paint(x0, y0, c, id) {
  const rad = Math.max(0.5, Number($("size").value) / 2);
  for (let y = Math.floor(y0 - rad); y <= y0 + rad; y++) for (let x = Math.floor(x0 - rad); x <= x0 + rad; x++) {
    if (x < 0 || y < 0 || x >= state.width || y >= state.height || (x - x0) ** 2 + (y - y0) ** 2 > rad * rad) continue;
    state.label[y * state.width + x] = c;
    state.inst[y * state.width + x] = id;
  }
}

function fill(x, y, c, id, sameInstance) {
  const start = y * state.width + x, from = state.label[start], fromInst = state.inst[start];
  if (from === c && fromInst === id) return;
  const stack = [start], seen = new Uint8Array(state.label.length);
  while (stack.length) {
    const i = stack.pop();
    if (seen[i] || state.label[i] !== from || (sameInstance && state.inst[i] !== fromInst)) continue;
    seen[i] = 1;
    state.label[i] = c; state.inst[i] = id;
    const px = i % state.width;
    if (px > 0) stack.push(i - 1);
    if (px + 1 < state.width) stack.push(i + 1);
    if (i >= state.width) stack.push(i - state.width);
    if (i + state.width < state.label.length) stack.push(i + state.width);
  }
}

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function onDown(event) {
  const [x, y] = at(event), i = y * state.width + x, t = tool();
  if (t === "select") return pick(state.inst[i]);
  snapshot();
  if (t === "brush" || t === "eraser") {
    const c = t === "eraser" ? 0 : state.cls;
    // a thing stroke that starts on an object of its class extends it; elsewhere it starts a new object
    state.stroke = thing(c) && state.label[i] === c ? state.inst[i] : newInstance(c);
    paint(x, y, c, state.stroke);
    $("label").setPointerCapture(event.pointerId);
    draw();
  } else if (t === "fill") {
    fill(x, y, state.cls, newInstance(state.cls), false);
    draw(); edited();
  } else if (t === "instance") {
    const c = state.label[i];
    if (!thing(c)) { state.undo.pop(); return status(`${state.info.classes[c].name} is not a thing class: it has no instances`); }
    fill(x, y, c, newInstance(c), true);
    pick(state.inst[i]);
    edited();
  }
}

function onMove(event) {
  if (state.stroke === null) return;
  const [x, y] = at(event), t = tool();
  paint(x, y, t === "eraser" ? 0 : state.cls, state.stroke);
  draw();
}

function onUp() {
  if (state.stroke === null) return;
  state.stroke = null;
  edited();
}

// ---- classes and styles ---------------------------------------------------------------------------------------
function showClasses() {
  const ul = $("classes");
  ul.innerHTML = "";
  for (const c of state.info.classes) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.title = `id ${c.id}${c.thing ? ", objects (instances)" : ""}${c.styles ? `, ${c.styles} styles` : ""}`;
    li.innerHTML = `<span class="swatch" style="background:${c.color}"></span>${c.name}${c.thing ? " ◆" : ""}`;
    li.onclick = () => { state.cls = c.id; for (const o of ul.children) o.classList.toggle("active", o === li); };
    if (c.id === state.cls) li.classList.add("active");
    ul.appendChild(li);
  }
}

const thumbnails = new Map();

async function pick(id) {
  state.selected = id;
  draw();
  await showObject();
}

async function showObject() {
  const id = state.selected, box = $("thumbnails");
  box.innerHTML = "";
  $("random-style").disabled = $("auto-style").disabled = true;
  if (id === null || !state.inst.includes(id)) { $("object").textContent = "pick an object with the object / style tool"; return; }
  const c = id >= 1000 ? Math.floor(id / 1000) : id, cls = state.info.classes[c];
  const chosen = state.styles.get(id);
  const shown = chosen === undefined ? "from the seed" : Array.isArray(chosen) ? "from the photo" : chosen;
  $("object").textContent = `${cls.name} ${id >= 1000 ? `#${id % 1000} (instance ${id})` : `(instance ${id})`}: ` +
    (cls.styles ? `style ${shown} of ${cls.styles}` : "no styles for this class");
  if (!cls.styles) return;
  if (!thumbnails.has(c)) thumbnails.set(c, (await (await api(`/styles/${c}`)).json()).styles);
  for (const s of thumbnails.get(c)) {
    const img = document.createElement("img");
    img.src = s.thumbnail; img.title = `style ${s.index}`; img.dataset.style = s.index;
    img.classList.toggle("chosen", chosen === s.index);
    img.onclick = () => setStyle(id, s.index);
    box.appendChild(img);
  }
  $("random-style").disabled = $("auto-style").disabled = false;
}

function setStyle(id, k) {
  snapshot();
  if (k === null) state.styles.delete(id); else state.styles.set(id, k);
  showObject();
  edited();
}

async function photoStyles() {
  try {
    const r = await (await api(`/samples/${encodeURIComponent(state.sample)}/photo-styles`)).json();
    snapshot();
    for (const [id, vector] of Object.entries(r.styles)) state.styles.set(Number(id), vector);
    state.note = `styles of ${Object.keys(r.styles).length} objects taken from the photo of ${state.sample}`;
    showObject();
    edited();
    if (!$("auto").checked) status(state.note);
  } catch (e) {
    status(`styles from the photo: ${e.message}`);
  }
}

function randomStyle() {
  const id = state.selected, c = id >= 1000 ? Math.floor(id / 1000) : id, n = state.info.classes[c].styles;
  const now = state.styles.get(id);
  let k = Math.floor(Math.random() * n);
  if (n > 1) while (k === now) k = Math.floor(Math.random() * n);
  setStyle(id, k);
}

// ---- rendering ------------------------------------------------------------------------------------------------
async function mapsPngs() {
  return [await encodeIds(state.width, state.height, state.label, 8), await encodeIds(state.width, state.height, state.inst, 16)];
}

async function toBase64(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function edited() {
  updateDownloads();
  if ($("auto").checked) render();
}

async function render() {
  if (state.rendering) { state.again = true; return; }
  state.rendering = true;
  document.body.dataset.busy = "1";
  try {
    do {
      state.again = false;
      const [label, inst] = await mapsPngs();
      const present = new Set(state.inst);
      const styles = Object.fromEntries([...state.styles].filter(([id]) => present.has(id)));
      const t0 = performance.now();
      const r = await api("/render", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ label: await toBase64(label), instances: await toBase64(inst), styles, seed: Number($("seed").value) }),
      });
      const blob = await r.blob();
      const ms = performance.now() - t0;
      if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
      state.imageUrl = URL.createObjectURL(blob);
      await new Promise((ok) => { $("image").onload = ok; $("image").src = state.imageUrl; });
      $("download-image").href = state.imageUrl;
      const model = r.headers.get("X-Model-Version");
      $("latency").textContent = `${Math.round(ms)} ms (server ${r.headers.get("X-Render-Ms")} ms)`;
      $("caption").textContent = `rendered by ${model}, ${state.width}x${state.height}`;
      $("model").textContent = model;
      state.renders += 1;
      document.body.dataset.renders = state.renders;
      status(state.note);
      state.note = "";
    } while (state.again);
  } catch (e) {
    status(`render: ${e.message}`);
  } finally {
    state.rendering = false;
    document.body.dataset.busy = "0"; // every edit so far is in the image shown
  }
}

async function updateDownloads() {
  const [label, inst] = await mapsPngs();
  for (const [id, blob] of [["download-label", label], ["download-instances", inst]]) {
    const a = $(id);
    if (a.href.startsWith("blob:")) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(blob);
  }
}

// ---- opening maps ---------------------------------------------------------------------------------------------
const b64bytes = (s) => Uint8Array.from(atob(s), (ch) => ch.charCodeAt(0));

async function open(value) {
  try {
    if (value === "file:") return; // the file already open
    state.sample = null;
    $("photo-styles").disabled = true;
    if (value.startsWith("blank:")) {
      const [h, w] = value.slice(6).split("x").map(Number);
      return blank(h, w);
    }
    const s = await (await api(`/samples/${encodeURIComponent(value)}`)).json();
    const label = await decodeIds(b64bytes(s.label));
    const inst = s.instances ? await decodeIds(b64bytes(s.instances)) : label;
    setMap(label.width, label.height, Uint8Array.from(label.ids), Uint16Array.from(inst.ids));
    if (s.photo && state.info.instance_feat) { state.sample = value; $("photo-styles").disabled = false; }
  } catch (e) {
    status(`open ${value}: ${e.message}`);
  }
}

async function openFile(file) {
  try {
    state.sample = null;
    $("photo-styles").disabled = true;
    const label = await decodeIds(new Uint8Array(await file.arrayBuffer()));
    setMap(label.width, label.height, Uint8Array.from(label.ids), Uint16Array.from(label.ids));
    // the list names the opened file, so that choosing a blank or a sample afterwards is a change that opens it
    const select = $("open");
    let entry = [...select.options].find((o) => o.value === "file:");
    if (!entry) select.add((entry = new Option("", "file:")), 0);
    entry.text = `file ${file.name}`;
    select.value = "file:";
  } catch (e) {
    status(`${file.name}: ${e.message}`);
  }
}

async function main() {
  state.info = await (await api("/classes")).json();
  $("model").textContent = state.info.model;
  showClasses();
  const select = $("open"), m = state.info.size_multiple;
  for (const [h, w] of BLANK) {
    if (h % m || w % m || Math.min(h, w) < state.info.min_size) continue;
    select.add(new Option(`blank ${w}x${h}`, `blank:${h}x${w}`));
  }
  const blanks = select.options.length;
  for (const name of (await (await api("/samples")).json()).samples) select.add(new Option(name, name));
  select.onchange = () => open(select.value);
  $("file").onchange = (e) => e.target.files[0] && openFile(e.target.files[0]);
  const canvas = $("label");
  canvas.addEventListener("pointerdown", onDown);
  canvas.addEventListener("pointermove", onMove);
  canvas.addEventListener("pointerup", onUp);
  $("render").onclick = render;
  $("undo").onclick = () => restore(state.undo, state.redo);
  $("redo").onclick = () => restore(state.redo, state.undo);
  $("random-style").onclick = randomStyle;
  $("photo-styles").onclick = photoStyles;
  $("auto-style").onclick = () => setStyle(state.selected, null);
  $("seed").onchange = edited;
  document.addEventListener("keydown", (e) => {
    if (!(e.ctrlKey || e.metaKey)) return;
    if (e.key === "z") { e.preventDefault(); restore(state.undo, state.redo); }
    if (e.key === "y") { e.preventDefault(); restore(state.redo, state.undo); }
  });
  // the first sample (or the first blank) is opened, and the list shows it: choosing another entry opens that
  select.selectedIndex = select.options.length > blanks ? blanks : 0;
  await open(select.value);
  document.body.dataset.ready = "1";
}

main().catch((e) => status(`editor: ${e.message}`));
