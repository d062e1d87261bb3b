// The pages: a router on the location's hash, one page at a time in <main>; the sign-in page first when the
// appliance has users and this browser has no session.
import { api, setCsrf } from "./api.js";
import { append, h, replace } from "./dom.js";
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
let session = null;

function show(view) {
  if (leaving) {
    leaving();
    leaving = null;
  }
  replace(document.getElementById("main"), view.element);
  leaving = view.leave || null;
}

function route() {
  if (session && session.users && !session.user) {
    show(signInPage());
    return;
  }
  const hash = location.hash || "#/devices";
  for (const [pattern, page] of routes) {
    const match = pattern.exec(hash);
    if (match) {
      show(page(...match.slice(1)));
      return;
    }
  }
  show({ element: h("section", {}, h("p", { class: "error" }, "No such page."), h("p", {}, h("a", { href: "#/devices" }, "Devices"))) });
}

function signInPage() {
  const message = h("p", { class: "error" });
  const form = h("form", { class: "signin" },
    h("label", {}, "User", h("input", { name: "user", autocomplete: "username", required: true })),
    h("label", {}, "Password", h("input", { name: "password", type: "password", autocomplete: "current-password", required: true })),
    h("button", { type: "submit", class: "primary" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(message);
    try {
      adopt(await api("POST", "/api/session", { user: form.elements.user.value, password: form.elements.password.value }));
      route();
    } catch (error) {
      replace(message, error.message);
      form.elements.password.value = "";
    }
  });
  return { element: h("section", {}, h("h1", {}, "Sign in"), form, message) };
}

function adopt(value) {
  session = value;
  setCsrf(value.csrf);
  const nav = document.querySelector("header nav");
  const old = document.getElementById("signout");
  if (old) old.remove();
  if (value.users && value.user) {
    const link = h("a", { href: "#/devices", id: "signout" }, `Sign out ${value.user}`);
    link.addEventListener("click", async (event) => {
      event.preventDefault();
      adopt(await api("DELETE", "/api/session"));
      route();
    });
    append(nav, link);
  }
}

window.addEventListener("sign-in-needed", () => {
  if (session) session = { ...session, user: null, csrf: null };
  route();
});
window.addEventListener("hashchange", route);
api("GET", "/api/session").then((value) => {
  adopt(value);
  route();
}).catch((error) => replace(document.getElementById("main"), h("p", { class: "error" }, `The appliance cannot be reached: ${error.message}`)));
