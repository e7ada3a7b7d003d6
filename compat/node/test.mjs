// Compatibility suite: drives the official @getbrevo/brevo 6.0.3 SDK (Fern) against a running
// switchboard. Results are the SDK's parsed plain objects; errors are the SDK's own classes:
//   Brevo.BadRequestError (400), Brevo.NotFoundError (404), BrevoError (anything else, e.g. 401),
// each with .statusCode, .body (parsed JSON) and .rawResponse.
//
// Environment (set by compat/run.sh): SWITCHBOARD_URL (…/v3), SWITCHBOARD_API_KEY,
// SWITCHBOARD_AGENT_ID/_NAME/_EMAIL/_USERPIC, SWITCHBOARD_AGENT2_ID/_NAME, SWITCHBOARD_GROUP_ID.
// With `compat/run.sh --tls` the URL is https:// and Node trusts the server's self-signed
// certificate through NODE_EXTRA_CA_CERTS, as a user's own CA would be trusted.
//
// Plain script: one line per check, closing line `N passed, N failed`, exit 1 on any failure.

import { randomBytes } from "node:crypto";
import { Brevo, BrevoClient, BrevoError } from "@getbrevo/brevo";

const env = process.env;
const URL_ = env.SWITCHBOARD_URL ?? "http://127.0.0.1:8080/v3";
const KEY = env.SWITCHBOARD_API_KEY ?? "";
const AGENT_ID = env.SWITCHBOARD_AGENT_ID ?? "";
const AGENT_NAME = env.SWITCHBOARD_AGENT_NAME ?? "";
const AGENT_EMAIL = env.SWITCHBOARD_AGENT_EMAIL ?? "";
const AGENT_USERPIC = env.SWITCHBOARD_AGENT_USERPIC ?? "";
const AGENT2_ID = env.SWITCHBOARD_AGENT2_ID ?? "";
const AGENT2_NAME = env.SWITCHBOARD_AGENT2_NAME ?? "";
const GROUP_ID = env.SWITCHBOARD_GROUP_ID ?? "";
// optional: an API key of a second account (required; compat/run.sh creates it)
const OTHER_KEY = env.SWITCHBOARD_OTHER_API_KEY ?? "";

const ID_RE = /^[23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz]{17}$/;
const ERROR_CODES = new Set([
  "invalid_parameter", "missing_parameter", "out_of_range", "campaign_processing", "campaign_sent",
  "document_not_found", "reseller_permission_denied", "not_enough_credits", "permission_denied",
  "duplicate_parameter", "duplicate_request", "method_not_allowed", "unauthorized",
  "account_under_validation", "not_acceptable", "bad_request",
]);
const RUN = randomBytes(5).toString("hex");

// maxRetries: 0 so that a 5xx/408/429 surfaces as a failure instead of being retried silently.
function makeClient({ apiKey = KEY, headers, baseUrl = URL_ } = {}) {
  return new BrevoClient({ apiKey, baseUrl, headers, maxRetries: 0, timeoutInSeconds: 20 });
}
const client = makeClient();
const c = client.conversations;

class Failure extends Error {}
function check(cond, msg) {
  if (!cond) throw new Failure(msg);
}
function eq(actual, expected, what) {
  if (actual !== expected) {
    throw new Failure(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}
function deepEq(a, b, what) {
  const sa = JSON.stringify(sortKeys(a));
  const sb = JSON.stringify(sortKeys(b));
  if (sa !== sb) throw new Failure(`${what}: expected ${sb}, got ${sa}`);
}
function sortKeys(v) {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === "object") {
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sortKeys(v[k])]));
  }
  return v;
}
const newVisitor = () => `compat-node-${RUN}-${randomBytes(4).toString("hex")}`;

async function expectError(promiseFn, status, codes) {
  let res;
  try {
    res = await promiseFn();
  } catch (e) {
    if (!(e instanceof BrevoError)) {
      throw new Failure(`expected a BrevoError ${status}, got ${e?.constructor?.name}: ${e?.message}`);
    }
    eq(e.statusCode, status, `statusCode (body ${JSON.stringify(e.body)})`);
    if (status === 400) check(e instanceof Brevo.BadRequestError, `400 is ${e.constructor.name}, not BadRequestError`);
    if (status === 404) check(e instanceof Brevo.NotFoundError, `404 is ${e.constructor.name}, not NotFoundError`);
    const body = e.body;
    check(body && typeof body === "object" && !Array.isArray(body), `error body is not a JSON object: ${JSON.stringify(body)}`);
    check(typeof body.message === "string", `error body lacks string message: ${JSON.stringify(body)}`);
    check(ERROR_CODES.has(body.code), `error code ${JSON.stringify(body.code)} not a Brevo errorModel code`);
    const ctype = e.rawResponse?.headers?.get("content-type") ?? "";
    check(ctype.toLowerCase().includes("application/json"), `error Content-Type is ${JSON.stringify(ctype)}`);
    if (codes !== undefined) {
      const list = Array.isArray(codes) ? codes : [codes];
      check(list.includes(body.code), `error code: expected one of ${JSON.stringify(list)}, got ${JSON.stringify(body.code)} (message ${JSON.stringify(body.message)})`);
    }
    return e;
  }
  throw new Failure(`expected a ${status} error, call returned ${JSON.stringify(res)}`);
}

function noNulls(obj, where = "response") {
  const nulls = Object.entries(obj).filter(([, v]) => v === null).map(([k]) => k);
  check(nulls.length === 0, `${where} has explicit null fields ${JSON.stringify(nulls)}`);
}

function checkCreatedAt(v) {
  check(Number.isInteger(v), `createdAt ${JSON.stringify(v)} is not an integer`);
  check(Math.abs(Date.now() - v) < 120_000, `createdAt ${v} is not close to now ${Date.now()}`);
}

const expectedHtml = (t) =>
  t.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;").replaceAll('"', "&quot;").replaceAll("\n", "<br>");

function checkHtml(m, text) {
  check(typeof m.html === "string", `html missing: ${JSON.stringify(m)}`);
  const norm = m.html
    .replaceAll("&#34;", "&quot;").replaceAll("&#x22;", "&quot;")
    .replaceAll("&#39;", "'").replaceAll("&#x27;", "'").replaceAll("&apos;", "'");
  eq(norm, expectedHtml(text), "html");
}

function checkAgentMessage(m, { text, visitorId, agentId, agentName, userpic, receivedFrom, pushed = false }) {
  check(m && typeof m === "object" && !Array.isArray(m), `result is not an object: ${JSON.stringify(m)}`);
  noNulls(m);
  check(typeof m.id === "string" && ID_RE.test(m.id), `id ${JSON.stringify(m.id)} is not a 17-char Meteor id`);
  eq(m.type, "agent", "type");
  eq(m.text, text, "text");
  eq(m.visitorId, visitorId, "visitorId");
  eq(m.agentId, agentId, "agentId");
  if (agentName) eq(m.agentName, agentName, "agentName");
  else check(typeof m.agentName === "string" && m.agentName.length > 0, `agentName missing`);
  if (userpic) eq(m.agentUserpic, userpic, "agentUserpic");
  else check(!("agentUserpic" in m), `agentUserpic present: ${JSON.stringify(m.agentUserpic)}`);
  checkCreatedAt(m.createdAt);
  eq(m.isPushed, pushed, "isPushed");
  eq(m.isMissed, false, "isMissed");
  eq(m.isMissedByVisitor, false, "isMissedByVisitor");
  eq(m.isTrigger, false, "isTrigger");
  if (receivedFrom) eq(m.receivedFrom, receivedFrom, "receivedFrom");
  else check(!("receivedFrom" in m), `receivedFrom present: ${JSON.stringify(m.receivedFrom)}`);
  checkHtml(m, text);
}

const send = (text = "Hello from compat", extra = {}) =>
  c.sendAMessageAsAnAgent({ visitorId: newVisitor(), text, agentId: AGENT_ID, ...extra });
const push = (text = "Your order has shipped", extra = {}) =>
  c.sendAnAutomatedMessageToAVisitor({ visitorId: newVisitor(), text, ...extra });

// ------------------------------------------------------------------ tests
const tests = [];
const test = (name, fn) => tests.push([name, fn]);

test("ping by agentId returns undefined with 201", async () => {
  const res = await c.setsAgentsStatusToOnlineFor23Minutes({ agentId: AGENT_ID });
  eq(res, undefined, "ping result");
  const { data, rawResponse } = await c.setsAgentsStatusToOnlineFor23Minutes({ agentId: AGENT_ID }).withRawResponse();
  eq(data, undefined, "ping data");
  eq(rawResponse.status, 201, "ping status");
});

test("ping by agentEmail + agentName + receivedFrom", async () => {
  const res = await c.setsAgentsStatusToOnlineFor23Minutes({
    agentEmail: `ping-${RUN}@compat.example`, agentName: "Ping Agent", receivedFrom: "CompatSuite",
  });
  eq(res, undefined, "ping result");
});

test("ping with {} is 400", async () => {
  await expectError(() => c.setsAgentsStatusToOnlineFor23Minutes({}), 400, ["missing_parameter", "invalid_parameter"]);
  // no argument at all: the SDK defaults the request to {}
  await expectError(() => c.setsAgentsStatusToOnlineFor23Minutes(), 400, ["missing_parameter", "invalid_parameter"]);
});

test("ping with unknown agentId is 400", async () => {
  await expectError(() => c.setsAgentsStatusToOnlineFor23Minutes({ agentId: "NoSuchAgent234567" }), 400,
    ["invalid_parameter", "document_not_found"]);
});

test("send message: all fields, html escaping, unicode", async () => {
  const visitorId = newVisitor();
  const text = 'Hi <b>there</b> & "friends"\nsecond line é ☃ 😀';
  const m = await c.sendAMessageAsAnAgent({ visitorId, text, agentId: AGENT_ID, receivedFrom: "CompatSuite" });
  checkAgentMessage(m, { text, visitorId, agentId: AGENT_ID, agentName: AGENT_NAME, userpic: AGENT_USERPIC, receivedFrom: "CompatSuite" });
  const { rawResponse } = await c.getAMessage({ id: m.id }).withRawResponse();
  eq(rawResponse.status, 200, "GET status");
  check((rawResponse.headers.get("content-type") ?? "").includes("application/json"), "GET content-type");
});

test("send message without receivedFrom, agent without userpic: fields omitted", async () => {
  const visitorId = newVisitor();
  const m = await c.sendAMessageAsAnAgent({ visitorId, text: "plain", agentId: AGENT2_ID });
  checkAgentMessage(m, { text: "plain", visitorId, agentId: AGENT2_ID, agentName: AGENT2_NAME });
});

test("send message by agentEmail creates the agent once", async () => {
  const agentEmail = `new-node-${RUN}@compat.example`;
  const m1 = await c.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "by email", agentEmail, agentName: "Node Newbie", receivedFrom: "CompatSuite" });
  check(ID_RE.test(m1.agentId ?? ""), `created agent id ${m1.agentId}`);
  eq(m1.agentName, "Node Newbie", "agentName");
  eq(m1.receivedFrom, "CompatSuite", "receivedFrom");
  check(m1.agentId !== AGENT_ID && m1.agentId !== AGENT2_ID, "email agent reused a fixture agent");
  const m2 = await c.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "again", agentEmail, agentName: "Node Newbie", receivedFrom: "CompatSuite" });
  eq(m2.agentId, m1.agentId, "same email, same agentId");
  const m3 = await send("by created id", { agentId: m1.agentId });
  eq(m3.agentId, m1.agentId, "agentId");
});

test("send message by agentEmail of an existing agent", async () => {
  const m = await c.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "existing", agentEmail: AGENT_EMAIL, agentName: AGENT_NAME, receivedFrom: "CompatSuite" });
  eq(m.agentId, AGENT_ID, "agentId");
});

test("unknown body keys pass through and are ignored", async () => {
  const m = await c.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "extra keys", agentId: AGENT_ID, someUnknownKey: { nested: [1] } },
    { additionalBodyParameters: { anotherUnknown: true } });
  eq(m.text, "extra keys", "text");
});

test("get message equals the posted one", async () => {
  const m = await send("get me", { receivedFrom: "CompatSuite" });
  const g = await c.getAMessage({ id: m.id });
  deepEq(g, m, "GET vs POST");
});

test("update message keeps id and createdAt", async () => {
  const m = await send("before edit");
  const u = await c.updateAMessageSentByAnAgent({ id: m.id, text: "after <edit>\nok" });
  eq(u.id, m.id, "id");
  eq(u.createdAt, m.createdAt, "createdAt");
  eq(u.text, "after <edit>\nok", "text");
  eq(u.agentId, m.agentId, "agentId");
  eq(u.visitorId, m.visitorId, "visitorId");
  eq(u.isPushed, false, "isPushed");
  checkHtml(u, "after <edit>\nok");
  const g = await c.getAMessage({ id: m.id });
  eq(g.text, "after <edit>\nok", "GET text");
  eq(g.createdAt, m.createdAt, "GET createdAt");
});

test("update message with missing/empty/null/wrong-type text is 400", async () => {
  const m = await send("put errors");
  await expectError(() => c.updateAMessageSentByAnAgent({ id: m.id }), 400, "missing_parameter");
  await expectError(() => c.updateAMessageSentByAnAgent({ id: m.id, text: "" }), 400, "missing_parameter");
  await expectError(() => c.updateAMessageSentByAnAgent({ id: m.id, text: null }), 400, ["missing_parameter", "invalid_parameter"]);
  await expectError(() => c.updateAMessageSentByAnAgent({ id: m.id, text: 42 }), 400, "invalid_parameter");
  await expectError(() => c.updateAMessageSentByAnAgent({ id: m.id, text: "a".repeat(100_001) }), 400, "out_of_range");
  eq((await c.getAMessage({ id: m.id })).text, "put errors", "text unchanged");
});

test("delete message: 204, undefined, then 404 NotFoundError", async () => {
  const m = await send("delete me");
  const { data, rawResponse } = await c.deleteAMessageSentByAnAgent({ id: m.id }).withRawResponse();
  eq(data, undefined, "delete data");
  eq(rawResponse.status, 204, "delete status");
  const e = await expectError(() => c.getAMessage({ id: m.id }), 404, "document_not_found");
  check(e.body.message.length > 0, "404 message empty");
  await expectError(() => c.deleteAMessageSentByAnAgent({ id: m.id }), 404, "document_not_found");
  await expectError(() => c.updateAMessageSentByAnAgent({ id: m.id, text: "x" }), 404, "document_not_found");
});

test("send message validation errors", async () => {
  await expectError(() => c.sendAMessageAsAnAgent({}), 400, "missing_parameter");
  await expectError(() => c.sendAMessageAsAnAgent({ visitorId: newVisitor(), agentId: AGENT_ID }), 400, "missing_parameter");
  await expectError(() => c.sendAMessageAsAnAgent({ text: "no visitor", agentId: AGENT_ID }), 400, "missing_parameter");
  await expectError(() => send(""), 400, "missing_parameter");
  await expectError(() => c.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "no agent" }), 400, ["missing_parameter", "invalid_parameter"]);
  await expectError(() => send(12345), 400, "invalid_parameter");
  await expectError(() => send({ nested: "object" }), 400, "invalid_parameter");
  await expectError(() => send("x", { agentId: "NoSuchAgent234567" }), 400, "invalid_parameter");
});

test("text length: 100,000 ok, 100,001 out_of_range", async () => {
  const m = await send("b".repeat(100_000));
  eq(m.text.length, 100_000, "text length");
  await expectError(() => send("b".repeat(100_001)), 400, "out_of_range");
});

test("text length counts characters: 100,000 emoji ok, 100,001 out_of_range", async () => {
  const m = await send("😀".repeat(100_000));
  eq([...m.text].length, 100_000, "code points");
  await expectError(() => send("😀".repeat(100_001)), 400, "out_of_range");
});

test("pushed message by agentId", async () => {
  const visitorId = newVisitor();
  const text = 'Order <shipped> & "tracked"\nthanks';
  const p = await c.sendAnAutomatedMessageToAVisitor({ visitorId, text, agentId: AGENT_ID });
  checkAgentMessage(p, { text, visitorId, agentId: AGENT_ID, agentName: AGENT_NAME, userpic: AGENT_USERPIC, pushed: true });
});

test("pushed message by groupId uses a group member", async () => {
  const p = await push("via group", { groupId: GROUP_ID });
  eq(p.isPushed, true, "isPushed");
  eq(p.agentId, AGENT_ID, "agentId (the group's only member)");
  eq(p.type, "agent", "type");
});

test("pushed message without agent or group picks an agent", async () => {
  const p = await push("random agent");
  eq(p.isPushed, true, "isPushed");
  check(ID_RE.test(p.agentId ?? ""), `agentId ${p.agentId}`);
});

test("pushed message get/update/delete", async () => {
  const p = await push("pushed crud", { agentId: AGENT_ID });
  deepEq(await c.getAnAutomatedMessage({ id: p.id }), p, "GET vs POST");
  const u = await c.updateAnAutomatedMessage({ id: p.id, text: "pushed <edited>" });
  eq(u.id, p.id, "id");
  eq(u.createdAt, p.createdAt, "createdAt");
  eq(u.text, "pushed <edited>", "text");
  eq(u.isPushed, true, "isPushed");
  checkHtml(u, "pushed <edited>");
  eq((await c.getAnAutomatedMessage({ id: p.id })).text, "pushed <edited>", "GET text");
  const { data, rawResponse } = await c.deleteAnAutomatedMessage({ id: p.id }).withRawResponse();
  eq(data, undefined, "delete data");
  eq(rawResponse.status, 204, "delete status");
  await expectError(() => c.getAnAutomatedMessage({ id: p.id }), 404, "document_not_found");
  await expectError(() => c.deleteAnAutomatedMessage({ id: p.id }), 404, "document_not_found");
  await expectError(() => c.updateAnAutomatedMessage({ id: p.id, text: "x" }), 404, "document_not_found");
});

test("pushed and agent message ids are separate namespaces", async () => {
  const p = await push("ns pushed", { agentId: AGENT_ID });
  const m = await send("ns message");
  await expectError(() => c.getAMessage({ id: p.id }), 404, "document_not_found");
  await expectError(() => c.getAnAutomatedMessage({ id: m.id }), 404, "document_not_found");
  await expectError(() => c.updateAMessageSentByAnAgent({ id: p.id, text: "x" }), 404, "document_not_found");
  await expectError(() => c.deleteAnAutomatedMessage({ id: m.id }), 404, "document_not_found");
  eq((await c.getAnAutomatedMessage({ id: p.id })).id, p.id, "pushed still there");
  eq((await c.getAMessage({ id: m.id })).id, m.id, "message still there");
});

test("pushed message validation errors", async () => {
  await expectError(() => c.sendAnAutomatedMessageToAVisitor({}), 400, "missing_parameter");
  await expectError(() => c.sendAnAutomatedMessageToAVisitor({ visitorId: newVisitor() }), 400, "missing_parameter");
  await expectError(() => push(""), 400, "missing_parameter");
  await expectError(() => push("x", { agentId: "NoSuchAgent234567" }), 400, "invalid_parameter");
  await expectError(() => push("c".repeat(100_001)), 400, "out_of_range");
  const p = await push("put errors", { agentId: AGENT_ID });
  await expectError(() => c.updateAnAutomatedMessage({ id: p.id }), 400, "missing_parameter");
});

test("unknown ids are 404", async () => {
  await expectError(() => c.getAMessage({ id: "NoSuchMessage2345" }), 404, "document_not_found");
  await expectError(() => c.deleteAMessageSentByAnAgent({ id: "NoSuchMessage2345" }), 404, "document_not_found");
  await expectError(() => c.getAnAutomatedMessage({ id: "NoSuchMessage2345" }), 404, "document_not_found");
  await expectError(() => c.deleteAnAutomatedMessage({ id: "NoSuchMessage2345" }), 404, "document_not_found");
  // the SDK sends GET …/messages/undefined when the id is missing
  await expectError(() => c.getAMessage({}), 404, "document_not_found");
});

test("odd ids in the path are 404, not a crash", async () => {
  // the SDK percent-encodes path params with encodeURIComponent
  for (const id of ["a/b", "a b", "ünïcödé☃", "a?b#c", "%2F", "x".repeat(300)]) {
    await expectError(() => c.getAMessage({ id }), 404, "document_not_found");
    await expectError(() => c.getAnAutomatedMessage({ id }), 404, "document_not_found");
  }
});

test("visitorGroup: assign with visitorId in the body, then remove with groupId null", async () => {
  const m = await send("visitor for group");
  const visitorId = m.visitorId;
  // The SDK's request type only declares groupId, but it sends the whole request object as the body.
  const r = await c.setVisitorGroupAssignment({ groupId: GROUP_ID, visitorId });
  deepEq(r, { visitorId, groupId: GROUP_ID }, "assign response");
  const { data, rawResponse } = await c.setVisitorGroupAssignment({ groupId: null, visitorId }).withRawResponse();
  eq(rawResponse.status, 200, "remove status");
  eq(data.visitorId, visitorId, "visitorId");
  check(!("groupId" in data), `groupId present after removal: ${JSON.stringify(data)}`);
});

test("visitorGroup: visitorId as query parameter", async () => {
  const m = await send("visitor for group via query");
  const r = await c.setVisitorGroupAssignment({ groupId: GROUP_ID }, { queryParams: { visitorId: m.visitorId } });
  deepEq(r, { visitorId: m.visitorId, groupId: GROUP_ID }, "assign response");
});

test("visitorGroup: visitorId via additionalBodyParameters", async () => {
  const m = await send("visitor for group via additional body");
  const r = await c.setVisitorGroupAssignment({ groupId: GROUP_ID }, { additionalBodyParameters: { visitorId: m.visitorId } });
  deepEq(r, { visitorId: m.visitorId, groupId: GROUP_ID }, "assign response");
});

test("visitorGroup: visitor with a pushed message only can be assigned", async () => {
  const p = await push("pushed to visitor", { agentId: AGENT_ID });
  const r = await c.setVisitorGroupAssignment({ groupId: GROUP_ID, visitorId: p.visitorId });
  deepEq(r, { visitorId: p.visitorId, groupId: GROUP_ID }, "assign response");
});

test("visitorGroup: unknown visitor is 404", async () => {
  await expectError(() => c.setVisitorGroupAssignment({ groupId: GROUP_ID, visitorId: `never-seen-${RUN}` }), 404, "document_not_found");
});

test("visitorGroup: missing visitorId / groupId are 400", async () => {
  await expectError(() => c.setVisitorGroupAssignment({ groupId: GROUP_ID }), 400, ["missing_parameter", "invalid_parameter"]);
  const m = await send("visitor for group errors");
  await expectError(() => c.setVisitorGroupAssignment({ visitorId: m.visitorId }), 400, ["missing_parameter", "invalid_parameter"]);
  await expectError(() => c.setVisitorGroupAssignment({}), 400, ["missing_parameter", "invalid_parameter"]);
});

test("visitorGroup: unknown groupId is a 4xx errorModel", async () => {
  const m = await send("visitor for unknown group");
  let err;
  try {
    await c.setVisitorGroupAssignment({ groupId: "NoSuchGroup234567", visitorId: m.visitorId });
  } catch (e) {
    err = e;
  }
  check(err instanceof BrevoError, `expected a BrevoError, got ${err?.constructor?.name ?? "success"}`);
  check(err.statusCode === 400 || err.statusCode === 404, `status ${err.statusCode}`);
  await expectError(() => Promise.reject(err), err.statusCode, ["invalid_parameter", "document_not_found"]);
});

test("bad api-key is 401 BrevoError with code unauthorized", async () => {
  const bad = makeClient({ apiKey: `xkeysib-definitely-wrong-${RUN}` }).conversations;
  await expectError(() => bad.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "x", agentId: AGENT_ID }), 401, "unauthorized");
  await expectError(() => bad.getAMessage({ id: "NoSuchMessage2345" }), 401, "unauthorized");
  await expectError(() => bad.setsAgentsStatusToOnlineFor23Minutes({ agentId: AGENT_ID }), 401, "unauthorized");
  await expectError(() => bad.setVisitorGroupAssignment({ groupId: GROUP_ID, visitorId: "v" }), 401, "unauthorized");
});

test("partner-key header is accepted", async () => {
  const pc = makeClient({ headers: { "partner-key": `xkeysib-partner-${RUN}` } }).conversations;
  const m = await pc.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "with partner key", agentId: AGENT_ID });
  eq(m.text, "with partner key", "text");
  eq((await pc.getAMessage({ id: m.id })).id, m.id, "GET with partner key");
});

test("pushed message with unknown groupId is 400", async () => {
  await expectError(() => push("x", { groupId: "NoSuchGroup234567" }), 400, "invalid_parameter");
});

test("concurrent sends: unique ids, all readable, concurrent deletes", async () => {
  const visitorId = newVisitor();
  const N = 40;
  const msgs = await Promise.all(Array.from({ length: N }, (_, i) =>
    i % 2 ? c.sendAMessageAsAnAgent({ visitorId, text: `burst ${i}`, agentId: AGENT_ID })
          : c.sendAnAutomatedMessageToAVisitor({ visitorId, text: `burst ${i}`, agentId: AGENT_ID })));
  const ids = new Set(msgs.map((m) => m.id));
  eq(ids.size, N, "distinct ids");
  for (const m of msgs) check(ID_RE.test(m.id), `id ${m.id}`);
  const got = await Promise.all(msgs.map((m) => (m.isPushed ? c.getAnAutomatedMessage({ id: m.id }) : c.getAMessage({ id: m.id }))));
  got.forEach((g, i) => deepEq(g, msgs[i], `GET ${i}`));
  await Promise.all(msgs.map((m) => (m.isPushed ? c.deleteAnAutomatedMessage({ id: m.id }) : c.deleteAMessageSentByAnAgent({ id: m.id }))));
  for (const m of msgs) {
    await expectError(() => (m.isPushed ? c.getAnAutomatedMessage({ id: m.id }) : c.getAMessage({ id: m.id })), 404, "document_not_found");
  }
});

test("other account is isolated", async () => {
  if (!OTHER_KEY) throw new Error("SWITCHBOARD_OTHER_API_KEY not set: run through compat/run.sh");
  const o = makeClient({ apiKey: OTHER_KEY }).conversations;
  const m = await send("account A only");
  const p = await push("account A pushed", { agentId: AGENT_ID });
  await expectError(() => o.getAMessage({ id: m.id }), 404, "document_not_found");
  await expectError(() => o.updateAMessageSentByAnAgent({ id: m.id, text: "hijack" }), 404, "document_not_found");
  await expectError(() => o.deleteAMessageSentByAnAgent({ id: m.id }), 404, "document_not_found");
  await expectError(() => o.getAnAutomatedMessage({ id: p.id }), 404, "document_not_found");
  await expectError(() => o.updateAnAutomatedMessage({ id: p.id, text: "hijack" }), 404, "document_not_found");
  await expectError(() => o.sendAMessageAsAnAgent({ visitorId: newVisitor(), text: "x", agentId: AGENT_ID }), 400, "invalid_parameter");
  await expectError(() => o.sendAnAutomatedMessageToAVisitor({ visitorId: newVisitor(), text: "x", groupId: GROUP_ID }), 400, "invalid_parameter");
  // account A's visitor is unknown to the other account; A's group is not the other account's
  await expectError(() => o.setVisitorGroupAssignment({ groupId: null, visitorId: m.visitorId }), 404, "document_not_found");
  eq((await c.getAMessage({ id: m.id })).text, "account A only", "message untouched");
  eq((await c.getAnAutomatedMessage({ id: p.id })).text, "account A pushed", "pushed untouched");
});

test("unicode and JSON escapes round-trip", async () => {
  const text = "emoji 😀 \u2028 tab\t quote\" backslash\\ ctl \u0001";
  const m = await send(text);
  eq(m.text, text, "text");
  eq((await c.getAMessage({ id: m.id })).text, text, "GET text");
});

// ------------------------------------------------------------------ runner
async function main() {
  const missing = ["SWITCHBOARD_API_KEY", "SWITCHBOARD_AGENT_ID", "SWITCHBOARD_AGENT2_ID", "SWITCHBOARD_GROUP_ID"].filter((n) => !env[n]);
  if (missing.length) {
    console.log(`missing environment: ${missing.join(", ")}`);
    console.log("0 passed, 1 failed");
    process.exitCode = 1;
    return;
  }
  console.log(`@getbrevo/brevo against ${URL_}`);
  let passed = 0;
  let failed = 0;
  for (const [name, fn] of tests) {
    try {
      await fn();
      passed += 1;
      console.log(`ok   ${name}`);
    } catch (e) {
      failed += 1;
      if (e instanceof Failure) console.log(`FAIL ${name}: ${e.message}`);
      else if (e instanceof BrevoError) console.log(`FAIL ${name}: unexpected ${e.constructor.name} ${e.statusCode} ${JSON.stringify(e.body)}`);
      else console.log(`FAIL ${name}: ${e?.constructor?.name}: ${e?.stack ?? e}`);
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exitCode = failed === 0 ? 0 : 1;
}

await main();
