// Devices: the Local archive and every [devices.*], each with a C-ECHO status refreshed on demand.
import { api, ApiError } from "./api.js";
import { h, replace } from "./dom.js";

export function devicesPage() {
  const body = h("tbody");
  const note = h("p", { class: "status" }, "Loading the devices…");
  const element = h("section", {},
    h("h1", {}, "Devices"),
    h("div", { class: "actions" }, h("button", { type: "button", on: { click: () => checkAll() } }, "Check all")),
    note,
    h("table", { class: "devices" },
      h("thead", {}, h("tr", {}, h("th", {}, "Device"), h("th", {}, "AE title"), h("th", {}, "Address"),
        h("th", {}, "TLS"), h("th", {}, "Status"), h("th", {}))),
      body));
  const checks = [];

  function checkAll() {
    for (const check of checks) check();
  }

  api("GET", "/api/devices").then(({ devices }) => {
    note.remove();
    for (const device of devices) {
      const status = h("td", { class: "status" }, "not checked");
      const check = () => echo(device, status);
      checks.push(check);
      body.append(h("tr", { dataset: { device: device.name } },
        h("td", {}, h("a", { href: `#/query/${device.name}` }, device.label)),
        h("td", {}, device.ae_title),
        h("td", {}, `${device.host}:${device.port}`),
        h("td", {}, device.tls ? "TLS" : "no"),
        status,
        h("td", {}, h("button", { type: "button", on: { click: check } }, "Check"))));
    }
    checkAll();
  }).catch((error) => replace(note, `The devices could not be listed: ${error.message}`));
  return { element };
}

async function echo(device, cell) {
  cell.className = "status";
  replace(cell, "checking…");
  try {
    const result = await api("POST", `/api/devices/${device.name}/echo`);
    if (result.ok) {
      cell.className = "ok";
      replace(cell, `reachable (${result.milliseconds} ms)`);
    } else {
      cell.className = "warning";
      replace(cell, `answered ${result.status}: ${result.meaning}`);
    }
  } catch (error) {
    cell.className = "error";
    const kind = error instanceof ApiError ? error.body.kind : null;
    const words = { rejected: "rejected", unreachable: "unreachable", tls: "TLS handshake failed", timeout: "no answer",
      refused: "no Verification" }[kind] || "failed";
    replace(cell, `${words}: ${error.message}`);
  }
}
