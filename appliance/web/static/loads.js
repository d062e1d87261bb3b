// Loads into memory (the Memory-Manager) with their progress, and the studies in memory.
import { api, bytes, formatDate } from "./api.js";
import { h, replace } from "./dom.js";

export function loadButton(device, study, series = undefined) {
  const holder = h("span", { class: "load" });
  const button = h("button", { type: "button", on: { click: () => start() } }, series ? "Load series" : "Load");
  holder.append(button);

  async function start() {
    button.disabled = true;
    const bar = h("progress", { max: 1, value: 0 });
    const words = h("span", { class: "status" }, " queued");
    replace(holder, bar, words);
    try {
      let load = await api("POST", "/api/loads", series ? { device, study, series } : { device, study });
      for (let rounds = 0; rounds < 10000; rounds += 1) {
        show(load, bar, words);
        if (["done", "failed", "cancelled"].includes(load.state)) break;
        load = await api("GET", `/api/loads/${load.id}?wait=30`);
      }
      if (load.state === "done") {
        words.append(" ", h("a", { href: `#/viewer/${study}${series ? "/" + series : ""}` }, "View"));
      }
    } catch (error) {
      words.className = "error";
      replace(words, ` ${error.message}`);
    }
  }
  return holder;
}

function show(load, bar, words) {
  const total = (load.remaining || 0) + load.completed + load.failed + load.warning;
  bar.max = Math.max(total, 1);
  bar.value = load.completed + load.failed + load.warning;
  if (load.state === "failed" || load.state === "cancelled") {
    words.className = "error";
    replace(words, ` ${load.state}: ${load.error || ""}`);
  } else {
    words.className = "status";
    replace(words, ` ${load.state}, ${load.completed} of ${total || "?"}${load.failed ? `, ${load.failed} failed` : ""}`);
  }
}

export function loadedPage() {
  const body = h("tbody");
  const summary = h("p", { class: "status" }, "Loading…");
  const element = h("section", {}, h("h1", {}, "Loaded studies"), summary,
    h("table", { class: "loaded" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Patient ID"), h("th", {}, "Date"),
        h("th", {}, "Description"), h("th", {}, "Modalities"), h("th", {}, "Series"), h("th", {}, "Images"),
        h("th", {}, "Size"), h("th", {}))),
      body));

  async function refresh() {
    try {
      const held = await api("GET", "/api/memory/studies");
      replace(summary, `${bytes(held.size)} of ${bytes(held.limit)} in use`);
      replace(body);
      for (const study of held.studies) {
        const free = h("button", { type: "button", disabled: study.in_use }, "Free");
        free.addEventListener("click", async () => {
          free.disabled = true;
          try {
            await api("DELETE", `/api/memory/studies/${study.study}`);
            refresh();
          } catch (error) {
            replace(summary, h("span", { class: "error" }, error.message));
            free.disabled = false;
          }
        });
        body.append(h("tr", { dataset: { study: study.study } },
          h("td", {}, h("a", { href: `#/viewer/${study.study}` }, study.patient_name || "(no name)")),
          h("td", {}, study.patient_id), h("td", {}, formatDate(study.study_date)), h("td", {}, study.description),
          h("td", {}, study.modalities.join(", ")), h("td", {}, String(study.series_count)),
          h("td", {}, String(study.instance_count)), h("td", {}, bytes(study.bytes)), h("td", {}, free)));
      }
      if (!held.studies.length) body.append(h("tr", {}, h("td", { colspan: 9, class: "status" }, "Nothing in memory.")));
    } catch (error) {
      replace(summary, h("span", { class: "error" }, error.message));
    }
  }
  refresh();
  return { element };
}
