// The Lumos API reference: renders this server's /openapi.json with plain DOM calls.
// No external assets (it works offline and under the page's CSP); text is set with textContent.
"use strict";

const METHODS = ["get", "post", "put", "patch", "delete"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// Text with `code` spans -> nodes (never HTML).
function rich(text) {
  const out = document.createDocumentFragment();
  String(text || "").split(/(`[^`]*`)/).forEach((part) => {
    if (part.startsWith("`") && part.endsWith("`") && part.length > 1) {
      out.append(el("code", {}, part.slice(1, -1)));
    } else if (part) {
      out.append(part);
    }
  });
  return out;
}

// A small Markdown subset (what the schema's descriptions use): paragraphs, #-headings,
// "- " lists, pipe tables and `code`; everything else is plain text.
function paragraphs(text) {
  const box = document.createDocumentFragment();
  for (const block of String(text || "").split(/\n\s*\n/)) {
    const lines = block.split("\n").map((l) => l.trim()).filter((l) => l);
    if (!lines.length) continue;
    const heading = /^(#{1,6})\s+(.*)$/.exec(lines[0]);
    if (heading && lines.length === 1) {
      box.append(el(`h${Math.min(6, heading[1].length + 1)}`, {}, rich(heading[2])));
    } else if (lines.every((l) => l.startsWith("|"))) {
      box.append(table(lines));
    } else if (lines.every((l) => /^[-*]\s/.test(l))) {
      box.append(el("ul", {}, ...lines.map((l) => el("li", {}, rich(l.slice(2))))));
    } else {
      box.append(el("p", {}, rich(lines.join(" "))));
    }
  }
  return box;
}

function table(lines) {
  const cells = (line) => line.replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  const rows = lines.filter((l) => !/^\|[\s|:-]+\|?$/.test(l)).map(cells);
  const out = el("table", { class: "md" });
  rows.forEach((row, i) => {
    out.append(el("tr", {}, ...row.map((c) => el(i === 0 ? "th" : "td", {}, rich(c)))));
  });
  return out;
}

function refName(ref) {
  return ref.split("/").pop();
}

function resolve(spec, schema) {
  if (schema && schema.$ref) return spec.components.schemas[refName(schema.$ref)] || {};
  return schema || {};
}

// A short type label: string, integer, SessionState, array of X, X | null.
function typeOf(schema) {
  if (!schema) return "any";
  if (schema.$ref) return refName(schema.$ref);
  if (schema.anyOf) return schema.anyOf.map(typeOf).join(" | ");
  if (schema.type === "array") return `array of ${typeOf(schema.items)}`;
  if (schema.type === "object" && schema.additionalProperties) {
    return `object of ${typeOf(schema.additionalProperties)}`;
  }
  return schema.type || "any";
}

function constraints(schema) {
  const parts = [];
  const all = [schema, ...(schema.anyOf || [])];
  for (const s of all) {
    if (s.minimum !== undefined) parts.push(`>= ${s.minimum}`);
    if (s.exclusiveMinimum !== undefined) parts.push(`> ${s.exclusiveMinimum}`);
    if (s.maximum !== undefined) parts.push(`<= ${s.maximum}`);
    if (s.maxLength !== undefined) parts.push(`max ${s.maxLength} chars`);
  }
  if (schema.default !== undefined && schema.default !== null) {
    parts.push(`default ${JSON.stringify(schema.default)}`);
  }
  return parts.join(", ");
}

function fieldsTable(spec, schema) {
  const s = resolve(spec, schema);
  const props = s.properties || {};
  const required = new Set(s.required || []);
  const table = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"),
    el("th", {}, "required"), el("th", {}, "description")));
  for (const [name, prop] of Object.entries(props)) {
    const extra = constraints(prop);
    table.append(el("tr", {},
      el("td", {}, el("code", {}, name)),
      el("td", {}, el("span", { class: "type" }, typeOf(prop))),
      el("td", {}, required.has(name) ? "yes" : "no"),
      el("td", {}, rich(prop.description || ""), extra ? el("span", { class: "muted" },
        (prop.description ? " (" : "(") + extra + ")") : null)));
  }
  return table;
}

function parametersTable(params) {
  const table = el("table", {}, el("tr", {}, el("th", {}, "name"), el("th", {}, "in"),
    el("th", {}, "type"), el("th", {}, "required"), el("th", {}, "description")));
  for (const p of params) {
    const extra = constraints(p.schema || {});
    table.append(el("tr", {},
      el("td", {}, el("code", {}, p.name)),
      el("td", {}, p.in),
      el("td", {}, el("span", { class: "type" }, typeOf(p.schema))),
      el("td", {}, p.required ? "yes" : "no"),
      el("td", {}, rich(p.description || ""), extra ? el("span", { class: "muted" },
        ` (${extra})`) : null)));
  }
  return table;
}

function responsesTable(responses) {
  const table = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "body"),
    el("th", {}, "meaning")));
  for (const [code, r] of Object.entries(responses || {})) {
    const types = Object.entries(r.content || {}).map(([mime, c]) =>
      c.schema && Object.keys(c.schema).length ? `${mime}: ${typeOf(c.schema)}` : mime);
    table.append(el("tr", {}, el("td", {}, el("code", {}, code)),
      el("td", {}, types.join(", ") || "-"), el("td", {}, r.description || "")));
  }
  return table;
}

function anchor(method, path) {
  return `op-${method}-${path.replace(/[^A-Za-z0-9]+/g, "-")}`;
}

function endpoint(spec, path, method, op) {
  const box = el("article", { class: "endpoint", id: anchor(method, path) },
    el("h3", {}, el("span", { class: `method ${method}` }, method.toUpperCase()), path));
  if (op.summary) box.append(el("strong", {}, op.summary));
  box.append(paragraphs(op.description));
  if (op.parameters && op.parameters.length) {
    box.append(el("h4", {}, "Parameters"), parametersTable(op.parameters));
  }
  const body = op.requestBody && op.requestBody.content;
  if (body) {
    for (const [mime, c] of Object.entries(body)) {
      box.append(el("h4", {}, `Request body (${mime}): ${typeOf(c.schema)}`),
        fieldsTable(spec, c.schema));
    }
  }
  box.append(el("h4", {}, "Responses"), responsesTable(op.responses));
  return box;
}

function render(spec) {
  document.title = `${spec.info.title} API`;
  document.getElementById("title").textContent = `${spec.info.title} API`;
  document.getElementById("version").textContent =
    `version ${spec.info.version} - OpenAPI ${spec.openapi}`;
  const desc = document.getElementById("description");
  if (spec.info.summary) desc.append(el("p", {}, el("strong", {}, spec.info.summary)));
  desc.append(paragraphs(spec.info.description));
  const toc = document.getElementById("toc");
  const list = document.getElementById("endpoints");
  list.append(el("h2", {}, "Endpoints"));
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of Object.keys(item)) {
      if (!METHODS.includes(method)) continue;
      toc.append(el("a", { href: `#${anchor(method, path)}` }, `${method.toUpperCase()} ${path}`));
      list.append(endpoint(spec, path, method, item[method]));
    }
  }
  const schemas = document.getElementById("schemas");
  schemas.append(el("h2", {}, "Schemas"));
  for (const [name, schema] of Object.entries((spec.components || {}).schemas || {})) {
    const box = el("div", { class: "schema", id: `schema-${name}` }, el("h3", {}, name));
    if (schema.description) box.append(paragraphs(schema.description));
    box.append(fieldsTable(spec, schema));
    schemas.append(box);
  }
}

async function main() {
  const status = document.getElementById("status");
  try {
    const reply = await fetch("/openapi.json", { cache: "no-store" });
    if (!reply.ok) throw new Error(`/openapi.json answered ${reply.status}`);
    render(await reply.json());
    status.textContent = "";
    status.hidden = true;
  } catch (e) {
    status.textContent = `Could not load the API schema: ${e.message}`;
    status.className = "error";
  }
}

main();
