// Imagine Flash playground: plain JS over the service's own /v1 API, no build step.
//
// GET v1/models fills the model selector (the students of the loaded family, then the
// teacher); the form posts to v1/images/generations and shows each PNG with the
// server's timings and the latency measured here. Compare mode runs every model on
// one seed, one request after another, so each latency is that model's own.
"use strict";

const MAX_SEED = (1n << 63n) - 1n; // the API takes seeds 0 .. 2**63-1, more than a JS number holds
const TEACHER_STEPS = 25; // the teacher's default here; the server allows min_steps..max_steps

const $ = (id) => document.getElementById(id);
const state = { models: [], busy: false }; // models: cards of flash-Nstep (by N), then teacher

class PlaygroundError extends Error {
  constructor(message, status = null) {
    super(message);
    this.status = status; // HTTP status when the API answered
  }
}

// ---- the API ----------------------------------------------------------------------------

async function api(path, body) {
  // GET (no body) or POST a JSON string; the API's error JSON becomes its message.
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = body;
  }
  let response, text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch (e) {
    throw new PlaygroundError(`Could not reach the service (${e.message}). Is it still running?`);
  }
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON: a proxy's error page, say
  }
  if (!response.ok) {
    const message = json?.error?.message ?? `HTTP ${response.status} ${response.statusText}`.trim();
    throw new PlaygroundError(message, response.status);
  }
  if (json === null) throw new PlaygroundError(`The service answered ${response.status} with something not JSON.`);
  return json;
}

function requestBody(fields, seed) {
  // `seed` is a decimal string, written into the JSON as it is (it may exceed 2**53).
  const json = JSON.stringify(fields);
  return seed === null ? json : `${json.slice(0, -1)},"seed":${seed}}`;
}

// ---- the model list ---------------------------------------------------------------------

async function loadModels() {
  let list;
  try {
    list = await api("v1/models");
  } catch (e) {
    if (e.status === 401) {
      $("key-row").hidden = false;
      $("api-key").focus();
    } else if (e.status === 503) {
      setStatus(`${e.message}; asking again in 2 s…`);
      setTimeout(loadModels, 2000);
      return;
    }
    clearError();
    showError(e.message);
    return;
  }
  clearError();
  setStatus("");
  const students = list.data
    .filter((m) => m.kind === "student" && m.steps?.length === 1) // not the `flash` alias
    .sort((a, b) => a.steps[0] - b.steps[0]);
  const teacher = list.data.find((m) => m.kind === "teacher");
  state.models = teacher ? [...students, teacher] : students;

  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => new Option(optionLabel(m), m.id)));
  const fallback = students.length ? students[students.length - 1].id : teacher?.id;
  select.value = state.models.some((m) => m.id === previous) ? previous : fallback;
  select.disabled = state.models.length === 0;
  $("generate").disabled = state.models.length === 0;

  if (teacher) {
    const steps = $("teacher-steps");
    steps.min = teacher.min_steps;
    steps.max = teacher.max_steps;
    steps.value = Math.min(Math.max(TEACHER_STEPS, teacher.min_steps), teacher.max_steps);
  }
  const size = list.data[0]?.sizes?.[0] ?? "?";
  $("family").textContent = `Family ${list.version}: ${size} images, backend ${list.backend}.`;
  updateMode();
}

function optionLabel(m) {
  if (m.kind === "teacher") return `Teacher (${m.min_steps} to ${m.max_steps} steps): ${m.id}`;
  return `${plural(m.steps[0], "step")}: ${m.id}`;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function isCompare() {
  return $("mode-compare").checked;
}

function updateMode() {
  const compare = isCompare();
  const hasTeacher = state.models.some((m) => m.kind === "teacher");
  const teacherChosen = $("model").value === "teacher";
  for (const el of document.querySelectorAll(".single-only")) el.hidden = compare;
  for (const el of document.querySelectorAll(".teacher-only")) {
    el.hidden = !(hasTeacher && (compare || teacherChosen));
  }
  $("generate").textContent = compare ? "Compare" : "Generate";
}

// ---- reading the form -------------------------------------------------------------------

function readSeed() {
  const raw = $("seed").value.trim();
  if (raw === "") return null;
  if (!/^\d+$/.test(raw) || BigInt(raw) > MAX_SEED) {
    throw new PlaygroundError(`Seed must be a whole number from 0 to ${MAX_SEED}, got "${raw}".`);
  }
  return BigInt(raw).toString();
}

function readInteger(id, what) {
  const raw = $(id).value.trim();
  if (!/^-?\d+$/.test(raw)) throw new PlaygroundError(`${what} must be a whole number, got "${raw}".`);
  return Number(raw); // the range is the server's to check: its message names the allowed values
}

function modelFields(card, prompt, n) {
  const fields = { prompt, model: card.id, n, response_format: "b64_json" };
  if (card.kind === "teacher") {
    fields.steps = readInteger("teacher-steps", "Teacher steps");
    const guidance = $("guidance").value.trim();
    if (guidance !== "") {
      fields.guidance_scale = Number(guidance);
      if (!Number.isFinite(fields.guidance_scale)) {
        throw new PlaygroundError(`Guidance scale must be a number, got "${guidance}".`);
      }
    }
  }
  return fields;
}

function plan() {
  // The requests to send: [{card, fields, seed}], seed a decimal string or null (server draws).
  const prompt = $("prompt").value;
  let seed = readSeed();
  if (!isCompare()) {
    const card = state.models.find((m) => m.id === $("model").value);
    const fields = modelFields(card, prompt, readInteger("n", "Images"));
    return { seed, runs: [{ card, fields, seed }] };
  }
  // Compare: every model on one seed, drawn here when none is given.
  seed ??= crypto.getRandomValues(new Uint32Array(1))[0].toString();
  return { seed, runs: state.models.map((card) => ({ card, fields: modelFields(card, prompt, 1), seed })) };
}

// ---- generating -------------------------------------------------------------------------

async function onSubmit(event) {
  event.preventDefault();
  if (state.busy || state.models.length === 0) return;
  clearError();
  let planned;
  try {
    planned = plan();
  } catch (e) {
    showError(e.message);
    return;
  }
  const { seed, runs } = planned;
  setBusy(true);
  $("results").replaceChildren();
  $("summary").textContent = "";
  const started = performance.now();
  let images = 0;
  try {
    for (const [i, run] of runs.entries()) {
      if (runs.length > 1) setStatus(`Generating ${i + 1} of ${runs.length}: ${run.card.id}…`);
      else setStatus("Generating…");
      images += await runOne(run, runs.length > 1);
    }
  } finally {
    setBusy(false);
  }
  const total = formatMs(performance.now() - started);
  const what = runs.length > 1 ? `Compared ${runs.length} models on seed ${seed}` : plural(images, "image");
  $("summary").textContent = images ? `${what}, ${total} in all.` : "No images: see the error above.";
  setStatus(images ? "Done." : "Failed.");
}

async function runOne(run, labelErrors) {
  // One request; its images replace a placeholder. Returns how many images came back.
  const placeholder = figure(shortLabel(run.card, run.fields.steps), run.card.id);
  placeholder.classList.add("pending");
  placeholder.querySelector(".latency").textContent = "waiting…";
  $("results").append(placeholder);
  const t0 = performance.now();
  try {
    const res = await api("v1/images/generations", requestBody(run.fields, run.seed));
    const roundTrip = performance.now() - t0;
    const shots = res.data.map((item, i) => {
      const seed = run.seed === null ? String(item.seed) : nthSeed(run.seed, i);
      const shot = figure(shortLabel(run.card, res.steps, res.guidance_scale), res.model, seed);
      const img = shot.querySelector("img");
      img.alt = `${res.model}, ${plural(res.steps, "step")}, seed ${seed}: ${run.fields.prompt}`;
      img.src = `data:image/png;base64,${item.b64_json}`;
      const t = res.timings;
      shot.querySelector(".latency").textContent =
        `round trip ${formatMs(roundTrip)} · server ${formatMs(t.total_ms)} ` +
        `(compute ${formatMs(t.compute_ms)}, queue ${formatMs(t.queue_ms)})`;
      return shot;
    });
    placeholder.replaceWith(...shots);
    return shots.length;
  } catch (e) {
    if (e.status === 401) $("key-row").hidden = false;
    placeholder.classList.replace("pending", "failed");
    placeholder.querySelector(".latency").textContent = `failed after ${formatMs(performance.now() - t0)}`;
    showError(labelErrors ? `${run.card.id}: ${e.message}` : e.message);
    return 0;
  }
}

function nthSeed(seed, i) {
  // the server gives image i the seed (seed + i) mod 2**63
  return ((BigInt(seed) + BigInt(i)) % (MAX_SEED + 1n)).toString();
}

function shortLabel(card, steps, guidance) {
  if (card.kind !== "teacher") return plural(card.steps[0], "step");
  const g = guidance === undefined || guidance === null ? "" : `, guidance ${guidance}`;
  return `teacher, ${plural(steps, "step")}${g}`;
}

function figure(label, model, seed = null) {
  const fig = document.createElement("figure");
  fig.className = "shot";
  const img = document.createElement("img");
  img.alt = "";
  const caption = document.createElement("figcaption");
  const title = document.createElement("strong");
  title.className = "label";
  title.textContent = label;
  const detail = document.createElement("span");
  detail.className = "detail";
  detail.textContent = seed === null ? model : `${model} · seed ${seed}`;
  const latency = document.createElement("span");
  latency.className = "latency";
  caption.append(title, detail, latency);
  fig.append(img, caption);
  return fig;
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
}

// ---- page state -------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("results").setAttribute("aria-busy", String(busy));
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  const box = $("error");
  const line = document.createElement("p");
  line.textContent = message;
  box.append(line);
  box.hidden = false;
}

function clearError() {
  $("error").replaceChildren();
  $("error").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("controls").addEventListener("submit", onSubmit);
  $("model").addEventListener("change", updateMode);
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", updateMode);
  $("use-key").addEventListener("click", loadModels);
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault(); // not a generation: try the key
      loadModels();
    }
  });
  updateMode();
  loadModels();
});
