// The pages: a router on the location's hash, one page at a time in <main>.
import { replace, h } from "./dom.js";
import { devicesPage } from "./devices.js";
import { queryPage } from "./query.js";
import { loadedPage } from "./loads.js";
import { viewerPage } from "./viewer.js";

const routes = [
  [/^#\/devices$/, () => devicesPage()],
  [/^#\/query\/([A-Za-z0-9_.-]{1,64})$/, (name) => queryPage(name)],
  [/^#\/loaded$/, () => loadedPage()],
  [/^#\/viewer\/([0-9.]{1,64})(?:\/([0-9.]{1,64}))?$/, (study, series) => viewerPage(study, series)],
];

let leaving = null;

async function route() {
  const main = document.getElementById("main");
  if (leaving) {
    leaving();
    leaving = null;
  }
  const hash = location.hash || "#/devices";
  for (const [pattern, page] of routes) {
    const match = pattern.exec(hash);
    if (match) {
      const view = page(...match.slice(1));
      replace(main, view.element);
      leaving = view.leave || null;
      return;
    }
  }
  replace(main, h("p", { class: "error" }, "No such page."), h("p", {}, h("a", { href: "#/devices" }, "Devices")));
}

window.addEventListener("hashchange", route);
route();
