// Query: studies on one device, then a study's series, then a series' images (Study Root C-FIND through the API).
import { api, ApiError, dicomDate, stream, text, values } from "./api.js";
import { h, replace } from "./dom.js";
import { loadButton } from "./loads.js";

const STUDY_COLUMNS = [
  ["Name", "00100010"], ["Patient ID", "00100020"], ["Birth date", "00100030"], ["Date", "00080020"],
  ["Modalities", "00080061"], ["Description", "00081030"], ["Accession", "00080050"],
  ["Series", "00201206"], ["Images", "00201208"],
];

export function queryPage(device) {
  let controller = null;
  const field = (name, label, attributes = {}) => h("label", {}, label, h("input", { name, ...attributes }));
  const form = h("form", { class: "query", autocomplete: "off" },
    field("q", "Patient name or ID (* for all)", { placeholder: "SMITH or 12345 or *" }),
    field("PatientID", "Patient ID"),
    field("AccessionNumber", "Accession number"),
    field("from", "Study date from", { type: "date" }),
    field("to", "Study date to", { type: "date" }),
    field("ModalitiesInStudy", "Modality", { placeholder: "CT" }),
    field("StudyDescription", "Study description"),
    h("button", { type: "submit", class: "primary" }, "Search"));
  const stop = h("button", { type: "button", disabled: true }, "Stop");
  const status = h("span", { class: "status" });
  const message = h("p", { class: "error" });
  const head = h("tr");
  const body = h("tbody");
  const table = h("table", { class: "results" }, h("thead", {}, head), body);
  let rows = [];
  let sorted = null;

  for (const [label, tag] of STUDY_COLUMNS) {
    const cell = h("th", { class: "sortable", on: { click: () => sortBy(tag, cell) } }, label);
    head.append(cell);
  }
  head.append(h("th", {}));

  const today = h("button", { type: "button", on: { click: () => presetDays(0) } }, "Today");
  const week = h("button", { type: "button", on: { click: () => presetDays(6) } }, "Last 7 days");
  stop.addEventListener("click", () => controller && controller.abort());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });

  function presetDays(days) {
    const end = new Date();
    const start = new Date(end.getTime() - days * 86400000);
    form.elements.from.value = isoDate(start);
    form.elements.to.value = isoDate(end);
    search();
  }

  function parameters() {
    const params = new URLSearchParams();
    const q = form.elements.q.value.trim();
    if (q && q !== "*") {
      if (/\d/.test(q)) params.set("PatientID", q);
      else params.set("PatientName", /[*?]/.test(q) ? q : `${q}*`);
    }
    for (const name of ["PatientID", "AccessionNumber", "ModalitiesInStudy", "StudyDescription"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    const from = form.elements.from.value.replaceAll("-", "");
    const to = form.elements.to.value.replaceAll("-", "");
    if (from || to) params.set("StudyDate", from === to ? from : `${from}-${to}`);
    return params;
  }

  async function search() {
    if (controller) controller.abort();
    controller = new AbortController();
    const started = performance.now();
    stop.disabled = false;
    replace(message);
    replace(status, "Querying…");
    replace(body);
    rows = [];
    sorted = null;
    for (const th of head.children) th.classList.remove("sorted-up", "sorted-down");
    try {
      const end = await stream(`/api/devices/${device}/studies?${parameters()}`, (study) => {
        rows.push(study);
        body.append(studyRow(device, study));
        replace(status, `${rows.length} so far…`);
      }, controller.signal);
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      replace(status, `${rows.length} ${rows.length === 1 ? "study" : "studies"} in ${seconds} s`);
      if (end.warnings && end.warnings.length) replace(message, h("span", { class: "warning" }, end.warnings.join(" ")));
    } catch (error) {
      if (error.name === "AbortError") {
        replace(status, `Stopped after ${rows.length} ${rows.length === 1 ? "study" : "studies"}.`);
      } else {
        replace(status);
        replace(message, describe(error));
      }
    } finally {
      stop.disabled = true;
      controller = null;
    }
  }

  function sortBy(tag, cell) {
    const up = !(sorted && sorted.tag === tag && sorted.up);
    sorted = { tag, up };
    for (const th of head.children) th.classList.remove("sorted-up", "sorted-down");
    cell.classList.add(up ? "sorted-up" : "sorted-down");
    rows.sort((a, b) => compare(text(a, tag), text(b, tag)) * (up ? 1 : -1));
    render();
  }

  function render() {
    replace(body);
    for (const study of rows) body.append(studyRow(device, study));
  }

  const element = h("section", {},
    h("h1", {}, device === "local" ? "Local archive" : `Device ${device}`),
    form, h("div", { class: "actions" }, today, week, stop, status), message, table);
  return { element, leave: () => controller && controller.abort() };
}

const COLUMNS = STUDY_COLUMNS.length + 1;

function studyRow(device, study) {
  const uid = values(study, "0020000D")[0];
  const expand = h("button", { type: "button", title: "Series" }, "▸");
  const row = h("tr", { class: "study", dataset: { study: uid || "" } },
    STUDY_COLUMNS.map(([, tag]) => h("td", {}, text(study, tag))),
    h("td", {}, uid ? loadButton(device, uid) : ""));
  row.firstChild.prepend(expand, " ");
  expander(expand, row, "child", "Querying the series…", async () => {
    const series = await api("GET", `/api/devices/${device}/studies/${uid}/series`);
    series.sort((a, b) => compare(text(a, "00200011"), text(b, "00200011")));
    return series.map((item) => seriesRow(device, uid, item));
  });
  return row;
}

function seriesRow(device, study, series) {
  const uid = values(series, "0020000E")[0];
  const expand = h("button", { type: "button", title: "Images" }, "▸");
  const row = h("tr", { class: "child series", dataset: { series: uid || "" } },
    h("td", { colspan: 3 }, expand, " ", `Series ${text(series, "00200011")} ${text(series, "0008103E")}`),
    h("td", {}, text(series, "00080021")),
    h("td", {}, text(series, "00080060")),
    h("td", { colspan: 3 }, text(series, "00180015")),
    h("td", {}, text(series, "00201209")),
    h("td", {}, uid ? loadButton(device, study, uid) : ""));
  row.collapse = expander(expand, row, "grandchild", "Querying the images…", async () => {
    const images = await api("GET", `/api/devices/${device}/studies/${study}/series/${uid}/instances`);
    images.sort((a, b) => compare(text(a, "00200013"), text(b, "00200013")));
    return images.map((image) => h("tr", { class: "grandchild image" },
      h("td", { colspan: 3 }, `Image ${text(image, "00200013")}`),
      h("td", { colspan: 4 }, text(image, "00080016")),
      h("td", { colspan: 3 }, [text(image, "00280010"), text(image, "00280011")].filter((v) => v).join(" × "))));
  });
  return row;
}

function expander(button, row, rowClass, waiting, fetchRows) {
  // the rows below ``row`` that ``button`` shows and hides (a query each time it opens); returns the hiding
  let children = null;
  const collapse = () => {
    if (!children) return;
    for (const child of children) {
      if (child.collapse) child.collapse();
      child.remove();
    }
    children = null;
    replace(button, "▸");
  };
  button.addEventListener("click", async () => {
    if (children) {
      collapse();
      return;
    }
    replace(button, "▾");
    const placeholder = h("tr", { class: rowClass }, h("td", { colspan: COLUMNS, class: "status" }, waiting));
    children = [placeholder];
    row.after(placeholder);
    try {
      const made = await fetchRows();
      if (!made.length) made.push(h("tr", { class: rowClass }, h("td", { colspan: COLUMNS, class: "status" }, "Nothing found.")));
      if (children && children[0] === placeholder) {
        placeholder.replaceWith(...made);
        children = made;
      }
    } catch (error) {
      replace(placeholder.firstChild, describe(error));
      placeholder.firstChild.className = "error";
    }
  });
  return collapse;
}

export function describe(error) {
  if (error instanceof ApiError && error.body && error.body.status) {
    return `${error.message} (${error.body.status})`;
  }
  return error.message;
}

function compare(a, b) {
  const x = Number(a);
  const y = Number(b);
  if (a !== "" && b !== "" && !Number.isNaN(x) && !Number.isNaN(y)) return x - y;
  return a.localeCompare(b);
}

function isoDate(date) {
  const value = dicomDate(date);
  return `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6, 8)}`;
}
