// The troth console: one static page over the operators' JSON API (/v1/admin).
// No build step and no dependency: the DOM is built with textContent only (never
// innerHTML), so actor state and commitment payloads can hold anything.
"use strict";

const REFRESH_MS = 2000;
const S = {
  key: sessionStorage.getItem("troth-key") || "",
  role: "read",
  actorType: "",
  actorCursor: null,
  principal: "",
  status: "",
  q: "",
  meta: "",
};

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "");
const json = (v) => h("pre", {}, JSON.stringify(v, null, 2));
const statusCell = (s) => h("td", { class: "status-" + s }, s);
const canWrite = () => S.role === "write";

async function api(method, path, body) {
  const headers = {};
  if (S.key) headers.authorization = "Bearer " + S.key;
  if (body !== undefined) headers["content-type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 401 || (resp.status === 403 && path === "/v1/admin/me")) {
    showLogin(data.error ? data.error.message : "an operator's API key is needed");
    throw new Error("not signed in");
  }
  if (!resp.ok) {
    const e = data.error || {};
    throw new Error(`${e.type || "HTTP " + resp.status}: ${e.message || ""}`);
  }
  return data;
}

function showLogin(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message;
}

function table(headings, rows) {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows),
  );
}

function action(label, fn, danger) {
  return h("button", {
    class: danger ? "danger" : null,
    onclick: async (ev) => {
      ev.preventDefault();
      if (danger && !confirm(label + "?")) return;
      try {
        await fn();
        setError("");
      } catch (err) {
        setError(err.message);
      }
      await render();
    },
  }, label);
}

function setError(text) {
  document.getElementById("error").textContent = text;
}

// -- views ------------------------------------------------------------------------

async function nodesView() {
  const [st, sh] = await Promise.all([api("GET", "/v1/admin/status"), api("GET", "/v1/admin/shards")]);
  const owners = [...new Set(sh.shards.map((s) => s.owner))].sort();
  const colour = (o) => (o ? `hsl(${(owners.indexOf(o) * 137) % 360} 60% 55%)` : "#d7dbe3");
  const fig = (label, v) => h("span", {}, label + " ", h("b", {}, v));
  return h(
    "div",
    {},
    h(
      "p",
      { class: "figures" },
      fig("shards", `${st.shards - st.unserved_shards}/${st.shards} served`),
      fig("actors", st.actors),
      fig("timers", st.timers),
      fig("outbox pending", st.outbox.pending),
      fig("dead/uncertain", st.outbox.stuck),
    ),
    h("h2", {}, "Nodes"),
    table(
      ["node", "live", "shards", "active actors", "cpu", "url", "lease expires in", ""],
      st.nodes.map((n) =>
        h(
          "tr",
          { "data-node": n.id },
          h("td", {}, n.id, n.id === st.node ? " (this node)" : "", n.draining ? " — draining" : ""),
          h("td", {}, n.live ? "yes" : "no"),
          h("td", { class: "num" }, n.shards),
          h("td", { class: "num" }, n.active_actors),
          h("td", { class: "num", title: "pinned by runtime.cpu" }, n.cpu ?? "-"),
          h("td", {}, n.url),
          h("td", { class: "num" }, n.lease_expires_in_seconds + " s"),
          h(
            "td",
            {},
            canWrite() && n.live
              ? n.draining
                ? action("Undo drain", () =>
                    api("POST", `/v1/admin/nodes/${encodeURIComponent(n.id)}/drain`, { undo: true }))
                : action("Drain", () =>
                    api("POST", `/v1/admin/nodes/${encodeURIComponent(n.id)}/drain`, {}), true)
              : null,
          ),
        ),
      ),
    ),
    h("h2", {}, "Shard leases"),
    h(
      "p",
      { class: "legend" },
      owners.map((o) => h("span", {}, h("i", { style: `background:${colour(o)}` }), o || "(free)")),
    ),
    h(
      "div",
      { class: "grid" },
      sh.shards.map((s) =>
        h("div", {
          title: `shard ${s.shard}: ${s.owner || "free"}, epoch ${s.epoch}`,
          style: `background:${colour(s.owner)}`,
        }),
      ),
    ),
    ...extensionSections(st),
  );
}

function extensionSections(st) {
  const known = new Set(["prefix", "shards", "unserved_shards", "nodes", "actors", "outbox",
    "timers", "recent_failures", "node"]);
  return Object.entries(st)
    .filter(([k]) => !known.has(k))
    .map(([k, v]) => h("div", {}, h("h2", {}, k), json(v)));
}

async function actorsView() {
  const types = (await api("GET", "/v1/admin/types")).types;
  const params = new URLSearchParams({ limit: "100" });
  if (S.actorType) params.set("type", S.actorType);
  if (S.actorCursor) params.set("cursor", S.actorCursor);
  const page = await api("GET", "/v1/admin/actors?" + params);
  const select = h(
    "select",
    {
      id: "actor-type",
      onchange: (ev) => {
        S.actorType = ev.target.value;
        S.actorCursor = null;
        render();
      },
    },
    h("option", { value: "" }, "every type"),
    types.map((t) => h("option", { value: t.name, selected: t.name === S.actorType }, t.name)),
  );
  return h(
    "div",
    {},
    h("form", { class: "filters" }, "Type ", select),
    table(
      ["actor"],
      page.items.map((name) => h("tr", {}, h("td", {}, h("a", { href: "#actor/" + name }, name)))),
    ),
    page.next_cursor
      ? action("Next page", async () => {
          S.actorCursor = page.next_cursor;
        })
      : S.actorCursor
        ? action("First page", async () => {
            S.actorCursor = null;
          })
        : null,
  );
}

async function actorView(type, id) {
  const path = `/v1/admin/actors/${encodeURIComponent(type)}/${encodeURIComponent(id)}`;
  const a = await api("GET", path);
  const timers = Object.values(a.timers || {});
  return h(
    "div",
    {},
    h("h2", {}, `${a.name}`),
    h("p", {}, `shard ${a.shard} on ${a.owner || "(no owner)"} (epoch ${a.epoch}) · version ${a.version}`
      + ` · seq ${a.seq} · updated ${when(a.updated_ms)} · ${a.cached_replies} cached replies`),
    canWrite()
      ? action("Delete actor", async () => {
          await api("DELETE", path);
          location.hash = "#actors";
        }, true)
      : null,
    h("h2", {}, "State"),
    json(a.state),
    h("h2", {}, "Timers"),
    table(["name", "method", "due", "every"], timers.map((t) =>
      h("tr", {}, h("td", {}, t.name), h("td", {}, t.method), h("td", {}, when(t.due_ms)),
        h("td", {}, t.every_seconds ? t.every_seconds + " s" : "")))),
    h("h2", {}, "Outbox"),
    outboxTable(a.outbox.map((e) => ({ ...e, origin: a.name }))),
    h("h2", {}, "Recent notifications"),
    table(["id", "data"], a.notifications.map((n) =>
      h("tr", {}, h("td", {}, n.id), h("td", {}, JSON.stringify(n.data))))),
  );
}

function outboxTable(entries) {
  return table(
    ["entry", "kind", "status", "attempts", "error", ""],
    entries.map((e) =>
      h(
        "tr",
        { "data-entry": e.id },
        h("td", {}, e.id),
        h("td", {}, e.kind),
        statusCell(e.status),
        h("td", { class: "num" }, e.attempts),
        h("td", {}, e.error || (e.result && e.result.error) || ""),
        h(
          "td",
          {},
          canWrite() && (e.status === "dead" || e.status === "uncertain")
            ? [
                action("Re-drive", () => api("POST", "/v1/admin/outbox/redrive", { id: e.id })),
                action("Purge", () => api("POST", "/v1/admin/outbox/purge", { id: e.id }), true),
              ]
            : null,
        ),
      ),
    ),
  );
}

async function principals() {
  const list = (await api("GET", "/v1/admin/commitments/principals")).principals;
  if (!S.principal && list.length) S.principal = list[0].principal;
  return list;
}

function commitmentRows(items, actions) {
  return table(
    ["id", "status", "trigger", "target", "dedup_key", "created", "due", "attempts", ""],
    items.map((c) =>
      h(
        "tr",
        { "data-commitment": c.id },
        h("td", {}, h("a", { href: `#commitment/${S.principal}/${c.id}` }, c.id)),
        statusCell(c.status),
        h("td", {}, c.trigger_type),
        h("td", {}, c.target),
        h("td", {}, c.dedup_key || ""),
        h("td", {}, (c.created_at || "").slice(0, 19).replace("T", " ")),
        h("td", {}, (c.due_at || "").slice(0, 19).replace("T", " ")),
        h("td", { class: "num" }, c.attempts),
        h("td", {}, actions ? actions(c) : null),
      ),
    ),
  );
}

function commitmentActions(c) {
  if (!canWrite()) return null;
  const base = `/v1/admin/commitments/${S.principal}/${c.id}`;
  return [
    c.status === "failed" ? action("Re-drive", () => api("POST", base + "/retry")) : null,
    c.status === "failed" || c.status === "pending"
      ? action("Cancel", () => api("POST", base + "/cancel"), true)
      : null,
  ];
}

function principalSelect(list) {
  return h(
    "select",
    {
      id: "principal",
      onchange: (ev) => {
        S.principal = ev.target.value;
        render();
      },
    },
    list.map((p) => h("option", { value: p.principal, selected: p.principal === S.principal },
      `${p.principal} (${Object.entries(p.counts).map(([k, v]) => `${v} ${k}`).join(", ")})`)),
  );
}

async function commitmentsView() {
  const list = await principals();
  const params = new URLSearchParams({ principal: S.principal || "local", limit: "100" });
  if (S.status) params.set("status", S.status);
  if (S.q) params.set("q", S.q);
  else if (S.meta) params.set("meta", S.meta);
  const page = await api("GET", "/v1/admin/commitments?" + params);
  const input = (id, value, placeholder) =>
    h("input", { id, value, placeholder, size: 28 });
  const form = h(
    "form",
    {
      class: "filters",
      onsubmit: (ev) => {
        ev.preventDefault();
        S.status = form.querySelector("#status").value;
        S.q = form.querySelector("#q").value.trim();
        S.meta = form.querySelector("#meta").value.trim();
        render();
      },
    },
    "Principal ", principalSelect(list),
    "Status ",
    h("select", { id: "status" }, h("option", { value: "" }, "any"),
      ["pending", "triggered", "fulfilled", "failed", "cancelled", "expired"].map((s) =>
        h("option", { value: s, selected: s === S.status }, s))),
    input("q", S.q, "id or dedup_key"),
    input("meta", S.meta, "metadata KEY=VALUE"),
    h("button", { type: "submit" }, "Search"),
  );
  return h(
    "div",
    {},
    form,
    commitmentRows(page.items, commitmentActions),
    page.truncated ? h("p", {}, "The search stopped before the end: narrow it.") : null,
    await secretSection(S.principal || "local"),
  );
}

// Where the principal's webhook signing secret stands: never the secret itself
// (the tenant reads it with its own key). A write operator may rotate it, e.g. when
// it leaked: the previous one then stops signing at once, or signs 24 h more.
async function secretSection(principal) {
  const path = `/v1/admin/commitments-secret/${encodeURIComponent(principal)}`;
  const s = await api("GET", path);
  const rotate = (keep) => api("POST", path + "/rotate", { keep_previous_seconds: keep });
  let facts;
  if (!s.made) facts = "none made yet (one is made when it first signs a delivery)";
  else if (s.configured) facts = "set in the nodes' configuration (rotated there)";
  else {
    facts = s.rotated_at ? `rotated at ${s.rotated_at}` : "never rotated";
    if (s.previous_expires_at) facts += `; the previous one signs too until ${s.previous_expires_at}`;
  }
  return h(
    "div",
    { id: "secret" },
    h("h2", {}, `Signing secret of ${principal}`),
    h("p", { id: "secret-status" }, facts),
    canWrite() && s.made && !s.configured
      ? h("p", {},
          action("Rotate, the previous secret signing 24 h more", () => rotate(86400), true), " ",
          action("Rotate, the previous secret stopping now", () => rotate(0), true))
      : null,
  );
}

async function commitmentView(principal, id) {
  S.principal = principal;
  const base = `/v1/admin/commitments/${encodeURIComponent(principal)}/${encodeURIComponent(id)}`;
  const c = await api("GET", base);
  return h(
    "div",
    {},
    h("h2", {}, `${c.id} `, h("span", { class: "status-" + c.status, id: "commitment-status" }, c.status)),
    commitmentActions(c),
    h("h2", {}, "Transitions"),
    table(["status", "at"], (c.transitions || []).map((t) =>
      h("tr", {}, statusCell(t.status), h("td", {}, t.at)))),
    h("h2", {}, "Delivery attempts"),
    table(["attempt", "at", "outcome", "status code", "ms", "error"], (c.attempts || []).map((a, i) =>
      h("tr", {}, h("td", { class: "num" }, a.attempt || i + 1), h("td", {}, a.at),
        statusCell(a.error ? "failed" : "fulfilled"), h("td", {}, a.status_code ?? ""),
        h("td", { class: "num" }, a.duration_ms ?? ""), h("td", {}, a.error || "")))),
    c.next_attempt_at ? h("p", { id: "next-attempt" }, `Next attempt at ${c.next_attempt_at}`) : null,
    h("h2", {}, "Commitment"),
    json(c),
  );
}

async function deadView() {
  const list = await principals();
  const params = new URLSearchParams({ principal: S.principal || "local", status: "failed",
    limit: "100" });
  const [failed, outbox] = await Promise.all([
    api("GET", "/v1/admin/commitments?" + params),
    api("GET", "/v1/admin/outbox?limit=100"),
  ]);
  return h(
    "div",
    {},
    h("h2", {}, "Failed commitments"),
    h("form", { class: "filters" }, "Principal ", principalSelect(list)),
    commitmentRows(failed.items, commitmentActions),
    h("h2", {}, "Dead or uncertain outbox entries (every actor)"),
    outboxTable(outbox.items),
  );
}

// -- routing and refresh ----------------------------------------------------------------

function route() {
  const parts = location.hash.slice(1).split("/").map(decodeURIComponent);
  const tab = parts[0] || "nodes";
  document.querySelectorAll("header nav a").forEach((a) => {
    a.classList.toggle("current", a.id === "nav-" + tab.replace(/^(actor|commitment)$/, "$&s"));
  });
  if (tab === "actor") return actorView(parts[1], parts.slice(2).join("/"));
  if (tab === "actors") return actorsView();
  if (tab === "commitment") return commitmentView(parts[1], parts[2]);
  if (tab === "commitments") return commitmentsView();
  if (tab === "dead") return deadView();
  return nodesView();
}

let rendering = false;
async function render() {
  if (rendering) return;
  rendering = true;
  const live = document.getElementById("live");
  try {
    const me = await api("GET", "/v1/admin/me");
    S.role = me.role;
    document.getElementById("who").textContent = `node ${me.node} · ${me.role}`;
    const view = await route();
    document.getElementById("view").replaceChildren(view);
    document.getElementById("login").hidden = true;
    live.classList.remove("stale");
    document.body.dataset.rendered = String(Date.now());
  } catch (err) {
    live.classList.add("stale");
    if (err.message !== "not signed in") setError(err.message);
  } finally {
    rendering = false;
  }
}

function typing() {
  const el = document.activeElement;
  return el && el.closest("#view form, #login") && el.tagName !== "BUTTON";
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  S.key = document.getElementById("key").value.trim();
  sessionStorage.setItem("troth-key", S.key);
  render();
});
window.addEventListener("hashchange", () => {
  setError("");
  render();
});
render();
setInterval(() => {
  if (!typing() && !document.hidden) render();
}, REFRESH_MS);
