// The appliance's API, and reading DICOM JSON (PS3.18 F.2) as the pages show it.

export class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body || {};
  }
}

let csrf = null;

export function setCsrf(token) {
  csrf = token;
}

export async function api(method, path, body = undefined, options = {}) {
  const init = { method, headers: {}, signal: options.signal, credentials: "same-origin" };
  if (method !== "GET") {
    // changes are JSON, and carry the session's CSRF token (what another site's page cannot send)
    init.headers["Content-Type"] = "application/json";
    if (csrf) init.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401 && options.signIn !== false && !path.startsWith("/api/session")) {
    window.dispatchEvent(new CustomEvent("sign-in-needed"));
  }
  const text = await response.text();
  let value = null;
  try {
    value = text ? JSON.parse(text) : null;
  } catch (error) {
    throw new ApiError(`the appliance answered ${response.status} with something that is not JSON`, response.status);
  }
  if (!response.ok) {
    throw new ApiError((value && value.error) || `HTTP ${response.status}`, response.status, value);
  }
  return options.withHeaders ? { value, headers: response.headers } : value;
}

export async function stream(path, onItem, signal) {
  // a streamed answer (application/x-ndjson): each line's object to onItem as it arrives; returns the last
  // line's {"end": ...}; an error answer (before anything was streamed) is thrown as an ApiError
  const response = await fetch(path, { headers: { Accept: "application/x-ndjson" }, signal, credentials: "same-origin" });
  if (!response.ok) {
    let value = {};
    try {
      value = await response.json();
    } catch (error) {
      value = {};
    }
    if (response.status === 401) window.dispatchEvent(new CustomEvent("sign-in-needed"));
    throw new ApiError(value.error || `HTTP ${response.status}`, response.status, value);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let end = null;
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      if (!line.trim()) continue;
      const item = JSON.parse(line);
      if (item && item.end) end = item.end;
      else onItem(item);
    }
    if (done) break;
  }
  if (!end) throw new ApiError("the answer ended early", response.status, {});
  if (end.error) throw new ApiError(end.error, 502, end);
  return end;
}

export function values(item, tag) {
  const element = item && item[tag];
  return element && Array.isArray(element.Value) ? element.Value : [];
}

export function text(item, tag) {
  // one element as text: a person name's groups, a list's values with backslashes, numbers as they are
  const element = item && item[tag];
  if (!element || !Array.isArray(element.Value)) return "";
  return element.Value.map((value) => {
    if (value === null || value === undefined) return "";
    if (typeof value === "object") {
      return [value.Alphabetic, value.Ideographic, value.Phonetic].filter((group) => group).join(" = ");
    }
    if (element.vr === "DA") return formatDate(String(value));
    if (element.vr === "TM") return formatTime(String(value));
    return String(value);
  }).join(element.vr === "PN" ? "; " : "\\");
}

export function formatDate(value) {
  return /^\d{8}$/.test(value) ? `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6, 8)}` : value;
}

export function formatTime(value) {
  return /^\d{4}/.test(value) ? `${value.slice(0, 2)}:${value.slice(2, 4)}${value.length >= 6 ? ":" + value.slice(4, 6) : ""}` : value;
}

export function dicomDate(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}${pad(date.getMonth() + 1)}${pad(date.getDate())}`;
}

export function bytes(count) {
  if (count >= 1 << 30) return `${(count / (1 << 30)).toFixed(1)} GiB`;
  if (count >= 1 << 20) return `${(count / (1 << 20)).toFixed(1)} MiB`;
  if (count >= 1 << 10) return `${(count / (1 << 10)).toFixed(1)} KiB`;
  return `${count} B`;
}

export function uidPath(uid) {
  if (!/^[0-9.]{1,64}$/.test(uid)) throw new Error(`not a UID: ${uid}`);
  return uid;
}
