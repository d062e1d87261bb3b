// The viewer of a loaded series: rendered PNGs from the memory API, one image at a time.
import { api, formatDate, text, values } from "./api.js";
import { h, replace } from "./dom.js";

const PRESETS = [["Default", null], ["Soft tissue", [40, 400]], ["Lung", [-600, 1500]], ["Bone", [400, 1800]],
  ["Brain", [40, 80]]];
const SHOWN = [["Patient", "00100010"], ["Patient ID", "00100020"], ["Study date", "00080020"],
  ["Study", "00081030"], ["Series", "0008103E"], ["Modality", "00080060"], ["Instance", "00200013"],
  ["Size", null], ["Slice thickness", "00180050"], ["Position", "00200032"], ["Window", null],
  ["SOP class", "00080016"], ["SOP instance", "00080018"], ["Transfer syntax", null]];

export function viewerPage(study, seriesUid) {
  const image = h("img", { alt: "" });
  const frame = h("input", { type: "range", min: 1, max: 1, value: 1, hidden: true });
  const counter = h("span", { class: "status" });
  const attributes = h("dl");
  const download = h("a", { download: "" }, "Download DICOM");
  const seriesChoice = h("select");
  const message = h("p", { class: "error" });
  const presets = h("div", { class: "actions" });
  const area = h("div", { class: "image", tabindex: 0 }, image);
  let instances = [];
  let index = 0;
  let windowing = null;
  let metadataRequest = 0;

  for (const [label, value] of PRESETS) {
    presets.append(h("button", { type: "button", on: { click: () => { windowing = value; show(); } } }, label));
  }

  function url(instance, suffix = "") {
    return `/api/memory/studies/${study}/series/${instance.series}/instances/${instance.instance}${suffix}`;
  }

  function show() {
    if (!instances.length) return;
    const instance = instances[index];
    const params = new URLSearchParams({ frame: String(Number(frame.value) - 1) });
    if (windowing) params.set("window", `${windowing[0]},${windowing[1]}`);
    image.src = url(instance, `/rendered?${params}`);
    download.href = url(instance);
    replace(counter, `image ${index + 1} of ${instances.length}`);
    describeInstance(instance);
  }

  async function describeInstance(instance) {
    const request = ++metadataRequest;
    try {
      const [metadata] = await api("GET", url(instance, "/metadata"));
      if (request !== metadataRequest) return;
      const frames = Number(values(metadata, "00280008")[0] || 1);
      frame.max = String(Math.max(frames, 1));
      frame.hidden = frames <= 1;
      replace(attributes);
      for (const [label, tag] of SHOWN) {
        let shown = tag ? text(metadata, tag) : "";
        if (label === "Size") shown = `${text(metadata, "00280011")} × ${text(metadata, "00280010")}${frames > 1 ? ` × ${frames} frames` : ""}`;
        if (label === "Window") shown = windowing ? `${windowing[0]} / ${windowing[1]}` : [text(metadata, "00281050"), text(metadata, "00281051")].filter((v) => v).join(" / ") || "from the pixel values";
        if (label === "Transfer syntax") shown = instance.transfer_syntax;
        if (shown) attributes.append(h("dt", {}, label), h("dd", {}, shown));
      }
    } catch (error) {
      if (request === metadataRequest) replace(attributes, h("dd", { class: "error" }, error.message));
    }
  }

  function move(step) {
    if (!instances.length) return;
    index = Math.min(Math.max(index + step, 0), instances.length - 1);
    frame.value = "1";
    show();
  }

  area.addEventListener("wheel", (event) => {
    event.preventDefault();
    move(event.deltaY > 0 ? 1 : -1);
  }, { passive: false });
  const keys = (event) => {
    if (["ArrowDown", "ArrowRight", "PageDown"].includes(event.key)) { event.preventDefault(); move(1); }
    if (["ArrowUp", "ArrowLeft", "PageUp"].includes(event.key)) { event.preventDefault(); move(-1); }
  };
  document.addEventListener("keydown", keys);
  frame.addEventListener("input", () => show());
  image.addEventListener("error", () => replace(message, "This image cannot be rendered here (its compression, or its pixel data): download it instead."));
  image.addEventListener("load", () => replace(message));

  let drag = null;
  area.addEventListener("mousedown", (event) => {
    event.preventDefault();
    drag = { x: event.clientX, y: event.clientY, start: windowing || [40, 400] };
  });
  document.addEventListener("mouseup", stopDrag);
  function stopDrag(event) {
    if (!drag) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 2) {
      windowing = [Math.round(drag.start[0] + dy * 2), Math.max(1, Math.round(drag.start[1] + dx * 4))];
      show();
    }
    drag = null;
  }

  seriesChoice.addEventListener("change", () => choose(seriesChoice.value));
  let held = null;
  function choose(uid) {
    const series = held.series.find((item) => item.series === uid) || held.series[0];
    instances = series.instances.map((item) => ({ ...item, series: series.series }));
    instances.sort((a, b) => (a.number ?? 0) - (b.number ?? 0));
    index = 0;
    frame.value = "1";
    show();
  }

  api("GET", `/api/memory/studies/${study}`).then((value) => {
    held = value;
    for (const series of held.series) {
      seriesChoice.append(h("option", { value: series.series }, `${series.modality || "?"} series ${series.series} (${series.instances.length})`));
    }
    if (seriesUid) seriesChoice.value = seriesUid;
    replace(title, held.patient_name || "(no name)", " ", h("span", { class: "muted" }, `${formatDate(held.study_date)} ${held.description}`));
    choose(seriesChoice.value);
  }).catch((error) => replace(message, `${error.message}. Load the study first.`));

  const title = h("h1", {}, "Viewer");
  const element = h("section", {}, title,
    h("div", { class: "actions" }, seriesChoice, counter, frame, download), presets, message,
    h("div", { class: "viewer" }, area, h("aside", {}, attributes)));
  return {
    element,
    leave: () => {
      document.removeEventListener("keydown", keys);
      document.removeEventListener("mouseup", stopDrag);
    },
  };
}
