#!/usr/bin/env python3
"""Compatibility suite: drives the official brevo-python 1.2.0 SDK against a running switchboard.

Every check goes through the SDK's own calls: results are the SDK's parsed models
(ConversationsMessage attributes), errors are the SDK's brevo_python.rest.ApiException
(attributes: status, reason, body (str), headers). Fields the 1.2.0 model does not
know (html) are read from the SDK's own last response (api_client.last_response.data).

Environment (set by compat/run.sh):
  SWITCHBOARD_URL          e.g. http://127.0.0.1:PORT/v3 (no trailing slash)
  SWITCHBOARD_API_KEY      a key registered on the server
  SWITCHBOARD_AGENT_ID     agent with email, userpic, member of SWITCHBOARD_GROUP_ID
  SWITCHBOARD_AGENT_NAME / SWITCHBOARD_AGENT_EMAIL / SWITCHBOARD_AGENT_USERPIC
  SWITCHBOARD_AGENT2_ID    agent without userpic, in no group
  SWITCHBOARD_AGENT2_NAME
  SWITCHBOARD_GROUP_ID     group whose only member is SWITCHBOARD_AGENT_ID
  SWITCHBOARD_OTHER_API_KEY  a key of a second account (tenant-isolation checks)
  SWITCHBOARD_ROOT         the server's root URL, http://127.0.0.1:PORT (visitor API checks)
  SWITCHBOARD_WIDGET_ID / SWITCHBOARD_IDENTITY_KEY
                           the default account's widget id and identity key
                           (`switchboard accounts widget --json`)
  SWITCHBOARD_CA_CERT      optional: the certificate (PEM) of a server serving HTTPS
                           (compat/run.sh --tls); the URLs are then https:// and wss://

The visitor API checks (ws_*, widget_*) talk to /widget/v1/... with urllib and to the
visitor WebSocket with the `websockets` asyncio client, and drive the agent side with the
SDK: an SDK message must arrive on the visitor's socket, a visitor message must be
readable with the SDK.

Plain script: prints one line per check and a closing `N passed, N failed`;
exits 1 if anything failed.
"""

import asyncio
import hashlib
import hmac
import json
import os
import re
import ssl
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

import brevo_python
import websockets
from brevo_python.rest import ApiException
from websockets.asyncio.client import connect as ws_connect

URL = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8080/v3")
KEY = os.environ.get("SWITCHBOARD_API_KEY", "")
AGENT_ID = os.environ.get("SWITCHBOARD_AGENT_ID", "")
AGENT_NAME = os.environ.get("SWITCHBOARD_AGENT_NAME", "")
AGENT_EMAIL = os.environ.get("SWITCHBOARD_AGENT_EMAIL", "")
AGENT_USERPIC = os.environ.get("SWITCHBOARD_AGENT_USERPIC", "")
AGENT2_ID = os.environ.get("SWITCHBOARD_AGENT2_ID", "")
AGENT2_NAME = os.environ.get("SWITCHBOARD_AGENT2_NAME", "")
GROUP_ID = os.environ.get("SWITCHBOARD_GROUP_ID", "")
# optional: an API key of a second account (required; compat/run.sh creates it)
OTHER_KEY = os.environ.get("SWITCHBOARD_OTHER_API_KEY", "")
# visitor API (required for the ws_* / widget_* checks; compat/run.sh sets them)
ROOT = os.environ.get("SWITCHBOARD_ROOT", "").rstrip("/")
WIDGET_ID = os.environ.get("SWITCHBOARD_WIDGET_ID", "")
IDENTITY_KEY = os.environ.get("SWITCHBOARD_IDENTITY_KEY", "")
WS_WAIT = 10.0  # seconds: the longest wait for any one frame or HTTP answer
# optional: the CA certificate (PEM) of a server run with --tls-cert (compat/run.sh --tls)
CA_CERT = os.environ.get("SWITCHBOARD_CA_CERT", "")
TLS = ssl.create_default_context(cafile=CA_CERT) if CA_CERT else None

ID_RE = re.compile(r"^[23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz]{17}$")
ERROR_CODES = {
    "invalid_parameter", "missing_parameter", "out_of_range", "campaign_processing",
    "campaign_sent", "document_not_found", "reseller_permission_denied",
    "not_enough_credits", "permission_denied", "duplicate_parameter",
    "duplicate_request", "method_not_allowed", "unauthorized",
    "account_under_validation", "not_acceptable", "bad_request",
}
RUN = uuid.uuid4().hex[:10]


def make_api(api_key=KEY, partner_key=None, host=URL):
    cfg = brevo_python.Configuration()
    cfg.host = host
    if CA_CERT:
        cfg.ssl_ca_cert = CA_CERT
    if api_key is not None:
        cfg.api_key["api-key"] = api_key
    if partner_key is not None:
        cfg.api_key["partner-key"] = partner_key
    return brevo_python.ConversationsApi(brevo_python.ApiClient(cfg))


API = make_api()


class Failure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(actual, expected, what):
    if actual != expected:
        raise Failure("%s: expected %r, got %r" % (what, expected, actual))


def new_visitor(tag=""):
    return "compat-py-%s-%s%s" % (RUN, uuid.uuid4().hex[:8], tag)


def last_json(api=API):
    """The raw JSON object of the SDK's last response (for fields the model lacks)."""
    resp = api.api_client.last_response
    data = resp.data
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    obj = json.loads(data)
    check(isinstance(obj, dict), "response body is not a JSON object: %r" % (data[:200],))
    return obj


def no_nulls(obj, where="response"):
    nulls = [k for k, v in obj.items() if v is None]
    check(not nulls, "%s has explicit null fields %r (absent fields must be omitted)" % (where, nulls))


def expect_api_error(fn, status, codes=None):
    """Call fn, expect brevo_python.rest.ApiException with `status`; return the parsed JSON body."""
    try:
        res = fn()
    except ApiException as e:
        eq(e.status, status, "ApiException.status (body %r)" % (e.body,))
        body = e.body
        if isinstance(body, bytes):
            body = body.decode("utf-8")
        try:
            parsed = json.loads(body)
        except (TypeError, ValueError):
            raise Failure("error body is not JSON: %r" % (body,))
        check(isinstance(parsed, dict), "error body is not an object: %r" % (parsed,))
        check(isinstance(parsed.get("message"), str), "error body lacks string message: %r" % (parsed,))
        check(parsed.get("code") in ERROR_CODES or status == 401,
              "error code %r not a Brevo errorModel code" % (parsed.get("code"),))
        ctype = ""
        for k, v in (e.headers or {}).items():
            if k.lower() == "content-type":
                ctype = v
        check("application/json" in ctype.lower(), "error Content-Type is %r" % (ctype,))
        if codes is not None:
            if isinstance(codes, str):
                codes = (codes,)
            check(parsed.get("code") in codes,
                  "error code: expected one of %r, got %r (message %r)"
                  % (tuple(codes), parsed.get("code"), parsed.get("message")))
        return parsed
    raise Failure("expected ApiException %d, call returned %r" % (status, res))


def check_created_at(value):
    check(type(value) is int, "created_at is %r (%s), not int" % (value, type(value).__name__))
    now = int(time.time() * 1000)
    check(abs(now - value) < 120_000, "created_at %d is not close to now %d" % (value, now))


def check_agent_message(m, *, text, visitor_id, agent_id, agent_name=None, userpic=None,
                        received_from=None, pushed=False):
    check(isinstance(m, brevo_python.ConversationsMessage),
          "result is %s, not ConversationsMessage" % type(m).__name__)
    check(isinstance(m.id, str) and ID_RE.match(m.id), "id %r is not a 17-char Meteor id" % (m.id,))
    eq(m.type, "agent", "type")
    eq(m.text, text, "text")
    eq(m.visitor_id, visitor_id, "visitor_id")
    eq(m.agent_id, agent_id, "agent_id")
    if agent_name is not None:
        eq(m.agent_name, agent_name, "agent_name")
    else:
        check(isinstance(m.agent_name, str) and m.agent_name, "agent_name missing: %r" % (m.agent_name,))
    eq(m.agent_userpic, userpic, "agent_userpic")
    check_created_at(m.created_at)
    eq(m.is_pushed, pushed, "is_pushed")
    eq(m.is_missed, False, "is_missed")
    eq(m.is_missed_by_visitor, False, "is_missed_by_visitor")
    eq(m.is_trigger, False, "is_trigger")
    eq(m.received_from, received_from, "received_from")


def expected_html(text):
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("\n", "<br>"))


def check_html(raw, text):
    html = raw.get("html")
    check(isinstance(html, str), "html missing from raw response: %r" % (raw,))
    # Accept the common spellings of the escaped double quote.
    norm = html.replace("&#34;", "&quot;").replace("&#x22;", "&quot;")
    norm = norm.replace("&#39;", "'").replace("&#x27;", "'").replace("&apos;", "'")
    eq(norm, expected_html(text), "html")


def send(text="Hello from compat", visitor_id=None, agent_id=None, **kw):
    visitor_id = visitor_id or new_visitor()
    body = brevo_python.Body15(visitor_id=visitor_id, text=text, agent_id=agent_id or AGENT_ID, **kw)
    return API.conversations_messages_post(body)


def push(text="Your order has shipped", visitor_id=None, **kw):
    visitor_id = visitor_id or new_visitor()
    return API.conversations_pushed_messages_post(brevo_python.Body17(visitor_id=visitor_id, text=text, **kw))


# ---------------------------------------------------------------- tests

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def ping_by_agent_id_returns_none_201():
    res = API.conversations_agent_online_ping_post(brevo_python.Body19(agent_id=AGENT_ID))
    eq(res, None, "ping result")
    data, status, _headers = API.conversations_agent_online_ping_post_with_http_info(
        brevo_python.Body19(agent_id=AGENT_ID))
    eq(data, None, "ping data")
    eq(status, 201, "ping status")
    eq(API.api_client.last_response.data, "", "ping body")


@test
def ping_by_email_name_received_from():
    res = API.conversations_agent_online_ping_post(brevo_python.Body19(
        agent_email="ping-%s@compat.example" % RUN, agent_name="Ping Agent", received_from="CompatSuite"))
    eq(res, None, "ping result")


@test
def ping_empty_body_is_400():
    expect_api_error(lambda: API.conversations_agent_online_ping_post(brevo_python.Body19()), 400,
                     ("missing_parameter", "invalid_parameter"))


@test
def ping_unknown_agent_id_is_400():
    expect_api_error(lambda: API.conversations_agent_online_ping_post(
        brevo_python.Body19(agent_id="NoSuchAgent234567")), 400, ("invalid_parameter", "document_not_found"))


@test
def post_message_full_fields_and_html():
    visitor = new_visitor()
    text = 'Hi <b>there</b> & "friends"\nsecond line é ☃ 😀'
    m = send(text, visitor_id=visitor, received_from="CompatSuite")
    check_agent_message(m, text=text, visitor_id=visitor, agent_id=AGENT_ID, agent_name=AGENT_NAME,
                        userpic=AGENT_USERPIC, received_from="CompatSuite")
    raw = last_json()
    no_nulls(raw)
    check_html(raw, text)
    check(type(raw.get("createdAt")) is int, "raw createdAt not an integer: %r" % (raw.get("createdAt"),))
    for flag in ("isPushed", "isMissed", "isMissedByVisitor", "isTrigger"):
        check(raw.get(flag) is False, "raw %s is %r, not JSON false" % (flag, raw.get(flag)))


@test
def post_message_without_received_from_or_userpic_omits_them():
    visitor = new_visitor()
    m = send("plain", visitor_id=visitor, agent_id=AGENT2_ID)
    check_agent_message(m, text="plain", visitor_id=visitor, agent_id=AGENT2_ID,
                        agent_name=AGENT2_NAME or None, userpic=None, received_from=None)
    raw = last_json()
    no_nulls(raw)
    check("receivedFrom" not in raw, "receivedFrom present: %r" % (raw,))
    check("agentUserpic" not in raw, "agentUserpic present for agent without userpic: %r" % (raw,))


@test
def post_message_agent_email_creates_agent_once():
    email = "new-%s@compat.example" % RUN
    m1 = API.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="by email", agent_email=email, agent_name="Newbie Agent",
        received_from="CompatSuite"))
    check(ID_RE.match(m1.agent_id or ""), "created agent id %r not a Meteor id" % (m1.agent_id,))
    eq(m1.agent_name, "Newbie Agent", "agent_name")
    eq(m1.received_from, "CompatSuite", "received_from")
    check(m1.agent_id not in (AGENT_ID, AGENT2_ID), "email agent reused a fixture agent")
    m2 = API.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="again", agent_email=email, agent_name="Newbie Agent",
        received_from="CompatSuite"))
    eq(m2.agent_id, m1.agent_id, "second message by the same email: agent_id")
    # The agent created by email can then be used by id.
    m3 = send("by created id", agent_id=m1.agent_id)
    eq(m3.agent_id, m1.agent_id, "agent_id")


@test
def post_message_agent_email_of_existing_agent():
    m = API.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="existing by email", agent_email=AGENT_EMAIL,
        agent_name=AGENT_NAME, received_from="CompatSuite"))
    eq(m.agent_id, AGENT_ID, "agent_id for the fixture agent's email")


@test
def post_message_ignores_unknown_keys():
    visitor = new_visitor()
    m = API.conversations_messages_post({"visitorId": visitor, "text": "extra keys", "agentId": AGENT_ID,
                                         "someUnknownKey": {"nested": [1, 2]}, "another": None})
    eq(m.text, "extra keys", "text")
    eq(m.visitor_id, visitor, "visitor_id")


@test
def get_message_matches_post():
    m = send("get me", received_from="CompatSuite")
    g = API.conversations_messages_id_get(m.id)
    check(isinstance(g, brevo_python.ConversationsMessage), "GET result type %s" % type(g).__name__)
    eq(g.to_dict(), m.to_dict(), "GET vs POST model")
    raw = last_json()
    no_nulls(raw)
    check_html(raw, "get me")


@test
def put_message_changes_text_keeps_id_and_created_at():
    m = send("before edit")
    time.sleep(0.01)
    u = API.conversations_messages_id_put(m.id, body=brevo_python.Body16(text="after <edit>\nok"))
    eq(u.id, m.id, "id after edit")
    eq(u.created_at, m.created_at, "created_at after edit")
    eq(u.text, "after <edit>\nok", "text after edit")
    eq(u.agent_id, m.agent_id, "agent_id after edit")
    eq(u.visitor_id, m.visitor_id, "visitor_id after edit")
    eq(u.is_pushed, False, "is_pushed")
    check_html(last_json(), "after <edit>\nok")
    g = API.conversations_messages_id_get(m.id)
    eq(g.text, "after <edit>\nok", "GET text after edit")
    eq(g.created_at, m.created_at, "GET created_at after edit")


@test
def put_message_without_body_is_400():
    # brevo-python's Body16 is optional: this sends Content-Length: 0 + Content-Type: application/json.
    m = send("put without body")
    expect_api_error(lambda: API.conversations_messages_id_put(m.id), 400, "missing_parameter")
    eq(API.conversations_messages_id_get(m.id).text, "put without body", "text unchanged")


@test
def put_message_empty_text_is_400():
    m = send("put empty")
    expect_api_error(lambda: API.conversations_messages_id_put(m.id, body={"text": ""}), 400,
                     "missing_parameter")
    expect_api_error(lambda: API.conversations_messages_id_put(m.id, body={"text": None}), 400,
                     ("missing_parameter", "invalid_parameter"))
    expect_api_error(lambda: API.conversations_messages_id_put(m.id, body={"text": 5}), 400,
                     "invalid_parameter")


@test
def delete_message_then_404():
    m = send("delete me")
    res = API.conversations_messages_id_delete(m.id)
    eq(res, None, "delete result")
    body = expect_api_error(lambda: API.conversations_messages_id_get(m.id), 404, "document_not_found")
    check(body.get("message"), "404 message empty")
    expect_api_error(lambda: API.conversations_messages_id_delete(m.id), 404, "document_not_found")
    expect_api_error(lambda: API.conversations_messages_id_put(m.id, body=brevo_python.Body16(text="x")),
                     404, "document_not_found")


@test
def delete_message_status_204():
    m = send("delete me 204")
    data, status, _ = API.conversations_messages_id_delete_with_http_info(m.id)
    eq(data, None, "delete data")
    eq(status, 204, "delete status")
    eq(API.api_client.last_response.data, "", "delete body")


@test
def post_message_empty_object_is_400():
    expect_api_error(lambda: API.conversations_messages_post({}), 400, "missing_parameter")


@test
def post_message_missing_text_is_400():
    expect_api_error(lambda: API.conversations_messages_post(
        {"visitorId": new_visitor(), "agentId": AGENT_ID}), 400, "missing_parameter")


@test
def post_message_missing_visitor_is_400():
    expect_api_error(lambda: API.conversations_messages_post(
        {"text": "no visitor", "agentId": AGENT_ID}), 400, "missing_parameter")


@test
def post_message_empty_text_is_400():
    expect_api_error(lambda: send(""), 400, "missing_parameter")


@test
def post_message_without_agent_is_400():
    expect_api_error(lambda: API.conversations_messages_post(
        {"visitorId": new_visitor(), "text": "no agent"}), 400, ("missing_parameter", "invalid_parameter"))


@test
def post_message_wrong_type_is_400():
    expect_api_error(lambda: API.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text=12345, agent_id=AGENT_ID)), 400, "invalid_parameter")
    expect_api_error(lambda: API.conversations_messages_post(brevo_python.Body15(
        visitor_id=["not", "a", "string"], text="x", agent_id=AGENT_ID)), 400, "invalid_parameter")


@test
def post_message_unknown_agent_id_is_400():
    expect_api_error(lambda: send("x", agent_id="NoSuchAgent234567"), 400, "invalid_parameter")


@test
def post_message_text_length_limit():
    m = send("a" * 100_000)
    eq(len(m.text), 100_000, "length of a 100,000-char text")
    expect_api_error(lambda: send("a" * 100_001), 400, "out_of_range")


@test
def text_length_limit_counts_characters_not_json_bytes():
    # brevo-python serialises with json.dumps(ensure_ascii=True): every "é" becomes the 6-byte
    # escape \u00e9, so the limit must count characters, not bytes. (Astral characters become
    # 12-byte surrogate pairs: 100,000 of them exceed the 1 MiB body limit and get 413, by design.)
    m = send("\u00e9" * 100_000)
    eq(len(m.text), 100_000, "characters in a 100,000-character text")
    expect_api_error(lambda: send("\u00e9" * 100_001), 400, "out_of_range")


@test
def pushed_message_by_agent():
    visitor = new_visitor()
    p = push("Order <shipped> & \"tracked\"\nthanks", visitor_id=visitor, agent_id=AGENT_ID)
    check_agent_message(p, text="Order <shipped> & \"tracked\"\nthanks", visitor_id=visitor,
                        agent_id=AGENT_ID, agent_name=AGENT_NAME, userpic=AGENT_USERPIC, pushed=True)
    raw = last_json()
    no_nulls(raw)
    check_html(raw, "Order <shipped> & \"tracked\"\nthanks")
    check(raw.get("isPushed") is True, "raw isPushed not JSON true")


@test
def pushed_message_by_group():
    p = push("via group", group_id=GROUP_ID)
    eq(p.is_pushed, True, "is_pushed")
    eq(p.agent_id, AGENT_ID, "agent_id (the group's only member)")
    eq(p.type, "agent", "type")


@test
def pushed_message_random_agent():
    p = push("random agent")
    eq(p.is_pushed, True, "is_pushed")
    check(ID_RE.match(p.agent_id or ""), "agent_id %r" % (p.agent_id,))


@test
def pushed_message_get_put_delete():
    p = push("pushed crud", agent_id=AGENT_ID)
    g = API.conversations_pushed_messages_id_get(p.id)
    eq(g.to_dict(), p.to_dict(), "GET vs POST model")
    u = API.conversations_pushed_messages_id_put(p.id, brevo_python.Body18(text="pushed edited"))
    eq(u.id, p.id, "id after edit")
    eq(u.created_at, p.created_at, "created_at after edit")
    eq(u.text, "pushed edited", "text after edit")
    eq(u.is_pushed, True, "is_pushed after edit")
    eq(API.conversations_pushed_messages_id_get(p.id).text, "pushed edited", "GET text after edit")
    data, status, _ = API.conversations_pushed_messages_id_delete_with_http_info(p.id)
    eq(data, None, "delete data")
    eq(status, 204, "delete status")
    expect_api_error(lambda: API.conversations_pushed_messages_id_get(p.id), 404, "document_not_found")
    expect_api_error(lambda: API.conversations_pushed_messages_id_delete(p.id), 404, "document_not_found")


@test
def pushed_and_agent_ids_are_separate_namespaces():
    p = push("namespace pushed", agent_id=AGENT_ID)
    m = send("namespace message")
    expect_api_error(lambda: API.conversations_messages_id_get(p.id), 404, "document_not_found")
    expect_api_error(lambda: API.conversations_pushed_messages_id_get(m.id), 404, "document_not_found")
    expect_api_error(lambda: API.conversations_messages_id_delete(p.id), 404, "document_not_found")
    expect_api_error(lambda: API.conversations_pushed_messages_id_put(m.id, brevo_python.Body18(text="x")),
                     404, "document_not_found")
    # both still exist
    eq(API.conversations_pushed_messages_id_get(p.id).id, p.id, "pushed still there")
    eq(API.conversations_messages_id_get(m.id).id, m.id, "message still there")


@test
def pushed_message_errors():
    expect_api_error(lambda: API.conversations_pushed_messages_post({}), 400, "missing_parameter")
    expect_api_error(lambda: API.conversations_pushed_messages_post({"visitorId": new_visitor()}), 400,
                     "missing_parameter")
    expect_api_error(lambda: push(""), 400, "missing_parameter")
    expect_api_error(lambda: push("x", agent_id="NoSuchAgent234567"), 400, "invalid_parameter")
    expect_api_error(lambda: push("a" * 100_001), 400, "out_of_range")
    p = push("put errors", agent_id=AGENT_ID)
    expect_api_error(lambda: API.conversations_pushed_messages_id_put(p.id, {}), 400, "missing_parameter")


@test
def unknown_ids_are_404():
    for op in (API.conversations_messages_id_get, API.conversations_messages_id_delete,
               API.conversations_pushed_messages_id_get, API.conversations_pushed_messages_id_delete):
        expect_api_error(lambda: op("NoSuchMessage2345"), 404, "document_not_found")


@test
def odd_ids_in_path_are_404():
    # brevo-python percent-encodes every character of a path parameter (safe='').
    for odd in ("a/b", "a b", "ünïcödé☃", "a?b#c", "%2F", "x" * 300):
        expect_api_error(lambda: API.conversations_messages_id_get(odd), 404, "document_not_found")
        expect_api_error(lambda: API.conversations_pushed_messages_id_get(odd), 404, "document_not_found")


@test
def bad_api_key_is_401():
    bad = make_api(api_key="xkeysib-definitely-wrong-" + RUN)
    body = expect_api_error(lambda: bad.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="x", agent_id=AGENT_ID)), 401)
    eq(body.get("code"), "unauthorized", "401 code")
    expect_api_error(lambda: bad.conversations_messages_id_get("NoSuchMessage2345"), 401, "unauthorized")
    expect_api_error(lambda: bad.conversations_agent_online_ping_post(
        brevo_python.Body19(agent_id=AGENT_ID)), 401, "unauthorized")


@test
def missing_api_key_is_401():
    nokey = make_api(api_key=None)
    expect_api_error(lambda: nokey.conversations_messages_id_get("NoSuchMessage2345"), 401, "unauthorized")


@test
def partner_key_header_accepted():
    api = make_api(partner_key="xkeysib-partner-" + RUN)
    m = api.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="with partner key", agent_id=AGENT_ID))
    eq(m.text, "with partner key", "text")
    eq(api.conversations_messages_id_get(m.id).id, m.id, "GET with partner key")


@test
def pushed_message_unknown_group_is_400():
    expect_api_error(lambda: push("x", group_id="NoSuchGroup234567"), 400, "invalid_parameter")


@test
def post_message_agent_email_without_name_for_new_agent_is_400():
    expect_api_error(lambda: API.conversations_messages_post({
        "visitorId": new_visitor(), "text": "x", "agentEmail": "nobody-%s@compat.example" % RUN}),
        400, "missing_parameter")


@test
def host_with_trailing_slash_works():
    # brevo-python joins host + path, so ".../v3/" gives "/v3//conversations/..."
    api = make_api(host=URL + "/")
    m = api.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="trailing slash", agent_id=AGENT_ID))
    eq(api.conversations_messages_id_get(m.id).text, "trailing slash", "GET via //")
    api.conversations_messages_id_delete(m.id)
    expect_api_error(lambda: api.conversations_messages_id_get(m.id), 404, "document_not_found")


@test
def other_account_is_isolated():
    if not OTHER_KEY:
        raise AssertionError("SWITCHBOARD_OTHER_API_KEY not set: run through compat/run.sh")
    other = make_api(api_key=OTHER_KEY)
    m = send("account A only")
    p = push("account A pushed", agent_id=AGENT_ID)
    expect_api_error(lambda: other.conversations_messages_id_get(m.id), 404, "document_not_found")
    expect_api_error(lambda: other.conversations_messages_id_put(m.id, body=brevo_python.Body16(text="hijack")),
                     404, "document_not_found")
    expect_api_error(lambda: other.conversations_messages_id_delete(m.id), 404, "document_not_found")
    expect_api_error(lambda: other.conversations_pushed_messages_id_get(p.id), 404, "document_not_found")
    expect_api_error(lambda: other.conversations_pushed_messages_id_delete(p.id), 404, "document_not_found")
    expect_api_error(lambda: other.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="x", agent_id=AGENT_ID)), 400, "invalid_parameter")
    expect_api_error(lambda: other.conversations_pushed_messages_post(brevo_python.Body17(
        visitor_id=new_visitor(), text="x", group_id=GROUP_ID)), 400, "invalid_parameter")
    expect_api_error(lambda: other.conversations_agent_online_ping_post(brevo_python.Body19(agent_id=AGENT_ID)),
                     400, ("invalid_parameter", "document_not_found"))
    eq(API.conversations_messages_id_get(m.id).text, "account A only", "message untouched")
    eq(API.conversations_pushed_messages_id_get(p.id).text, "account A pushed", "pushed untouched")
    # the same agentEmail in another account is another agent
    email = "shared-%s@compat.example" % RUN
    a = API.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="x", agent_email=email, agent_name="Shared", received_from="C"))
    b = other.conversations_messages_post(brevo_python.Body15(
        visitor_id=new_visitor(), text="x", agent_email=email, agent_name="Shared", received_from="C"))
    check(a.agent_id != b.agent_id, "agentEmail resolved to the same agent in two accounts")


@test
def unicode_and_escapes_round_trip():
    text = "emoji 😀 \u2028 tab\t quote\" backslash\\ nul-ish \u0001"
    m = send(text)
    eq(m.text, text, "text round trip")
    eq(API.conversations_messages_id_get(m.id).text, text, "GET text round trip")


# ---------------------------------------------------------------- visitor API + WebSocket
#
# The visitor side is plain HTTP (urllib) plus the `websockets` asyncio client; the agent
# side is the SDK, called through asyncio.to_thread so the event loop keeps reading the
# socket while the SDK's blocking request runs. Every wait is bounded (WS_WAIT per frame,
# RUN_LIMIT per check).

RUN_LIMIT = 60.0
# urllib would honour *_proxy variables; the visitor API is only ever reached directly.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                      urllib.request.HTTPSHandler(context=TLS))


def widget_env():
    missing = [n for n, v in (("SWITCHBOARD_ROOT", ROOT), ("SWITCHBOARD_WIDGET_ID", WIDGET_ID),
                              ("SWITCHBOARD_IDENTITY_KEY", IDENTITY_KEY)) if not v]
    if missing:
        raise Failure("%s not set: run through compat/run.sh" % ", ".join(missing))
    parts = urllib.parse.urlsplit(ROOT)
    scheme = "https" if CA_CERT else "http"
    check(parts.scheme == scheme and parts.hostname == "127.0.0.1" and parts.port,
          "SWITCHBOARD_ROOT %r is not the %s://127.0.0.1:PORT address the server printed"
          % (ROOT, scheme))


def widget_http(method, path, body=None, token=None):
    """Plain HTTP to /widget/v1/{widgetId}{path}: (status, parsed JSON or None, headers)."""
    widget_env()
    url = "%s/widget/v1/%s%s" % (ROOT, WIDGET_ID, path)
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with _DIRECT.open(req, timeout=WS_WAIT) as resp:
            status, raw, headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read(), e.headers
    text = raw.decode("utf-8")
    if not text:
        return status, None, headers
    try:
        return status, json.loads(text), headers
    except ValueError:
        raise Failure("%s %s -> %d with a non-JSON body %r" % (method, path, status, text[:300]))


def widget_session(**fields):
    status, body, _ = widget_http("POST", "/session", fields)
    check(status == 200, "POST /widget/v1/{widgetId}/session %r -> %d %r" % (fields, status, body))
    for k in ("visitorId", "conversationId", "token"):
        check(isinstance(body.get(k), str) and body[k], "session answer lacks %s: %r" % (k, body))
    return body


def identity_hash(visitor_id, key=None):
    key = IDENTITY_KEY if key is None else key
    return hmac.new(key.encode(), visitor_id.encode(), hashlib.sha256).hexdigest()


def ws_url(token, **params):
    widget_env()
    query = urllib.parse.urlencode(dict(token=token, **params))
    scheme = "wss" if CA_CERT else "ws"
    return "%s://%s/widget/v1/%s/ws?%s" % (scheme, urllib.parse.urlsplit(ROOT).netloc, WIDGET_ID,
                                          query)


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, RUN_LIMIT)
    return asyncio.run(bounded())


class VisitorSocket:
    """A visitor WebSocket: JSON frames read with a bounded wait; cursors must grow."""

    def __init__(self, ws):
        self.ws = ws
        self.last_cursor = None
        self.seen = []  # short descriptions, for failure messages

    async def frame(self, what):
        try:
            raw = await asyncio.wait_for(self.ws.recv(), WS_WAIT)
        except asyncio.TimeoutError:
            raise Failure("no frame within %.0f s while waiting for %s (frames so far: %s)"
                          % (WS_WAIT, what, self.seen or "none"))
        except websockets.ConnectionClosed as e:
            raise Failure("socket closed while waiting for %s: %s (frames so far: %s)"
                          % (what, e, self.seen or "none"))
        check(isinstance(raw, str), "binary frame while waiting for %s: %r" % (what, raw[:200]))
        try:
            f = json.loads(raw)
        except ValueError:
            raise Failure("frame is not JSON: %r" % (raw[:300],))
        check(isinstance(f, dict) and isinstance(f.get("event"), str), "frame without event: %r" % (raw[:300],))
        self.seen.append(raw if len(raw) <= 300 else raw[:300] + "...")
        if f["event"] != "pong":
            c = f.get("cursor")
            check(type(c) is int and c >= 0, "frame cursor %r is not a non-negative integer: %s" % (c, raw[:300]))
            if self.last_cursor is not None:
                if f["event"] == "ready":  # ready repeats the cursor of the last replayed frame
                    check(c >= self.last_cursor, "ready cursor %d below %d" % (c, self.last_cursor))
                else:
                    check(c > self.last_cursor, "cursor %d does not grow past %d: %s"
                          % (c, self.last_cursor, raw[:300]))
            self.last_cursor = c
        return f

    async def expect(self, event, what=None):
        f = await self.frame(what or "a %s frame" % event)
        if f["event"] != event:
            raise Failure("expected a %s frame (%s), got %s" % (event, what or "", json.dumps(f)[:500]))
        return f

    async def expect_silence(self, seconds):
        try:
            raw = await asyncio.wait_for(self.ws.recv(), seconds)
        except asyncio.TimeoutError:
            return
        raise Failure("unexpected extra frame %r (frames before it: %s)" % (raw[:300], self.seen))


class visitor_socket:
    """async with visitor_socket(token[, after=...]) as vs: ... (closes the socket on exit)."""

    def __init__(self, token, **params):
        self.url = ws_url(token, **params)
        self.cm = None

    async def __aenter__(self):
        # proxy=None: connect straight to the 127.0.0.1 address, whatever the environment says.
        extra = {"ssl": TLS} if TLS else {}
        self.cm = ws_connect(self.url, open_timeout=WS_WAIT, close_timeout=5, proxy=None, **extra)
        return VisitorSocket(await self.cm.__aenter__())

    async def __aexit__(self, *exc):
        return await self.cm.__aexit__(*exc)


async def sdk(fn, *args, **kw):
    """An SDK call from inside the event loop (in a worker thread)."""
    return await asyncio.to_thread(fn, *args, **kw)


def frame_message(f, what):
    m = f.get("message")
    check(isinstance(m, dict), "%s frame has no message object: %s" % (what, json.dumps(f)[:500]))
    return m


@test
def ws_sdk_message_arrives_as_message_created():
    s = widget_session(name="Compat Visitor", pageUrl="https://compat.example/pricing")
    vid, token = s["visitorId"], s["token"]
    text = 'live <hello> & "welcome"\nfrom the SDK \U0001F600'

    async def scenario():
        async with visitor_socket(token) as vs:
            await vs.expect("ready")
            m = await sdk(send, text, visitor_id=vid, received_from="CompatSuite")
            raw = last_json()
            eq(m.visitor_id, vid, "SDK visitor_id")
            f = await vs.expect("messageCreated", "the SDK's message %s" % m.id)
            msg = frame_message(f, "messageCreated")
            eq(msg.get("id"), m.id, "frame message.id vs the SDK's id")
            eq(msg.get("text"), text, "frame message.text")
            eq(msg.get("type"), "agent", "frame message.type")
            eq(msg.get("visitorId"), vid, "frame message.visitorId")
            eq(msg.get("agentId"), AGENT_ID, "frame message.agentId")
            eq(msg, raw, "frame message vs the SDK's response body")
    run(scenario())


@test
def ws_sdk_edit_and_delete_arrive():
    s = widget_session()
    vid, token = s["visitorId"], s["token"]

    async def scenario():
        async with visitor_socket(token) as vs:
            await vs.expect("ready")
            m = await sdk(send, "to be edited", visitor_id=vid)
            eq(frame_message(await vs.expect("messageCreated"), "messageCreated").get("id"), m.id,
               "messageCreated message.id")
            u = await sdk(API.conversations_messages_id_put, m.id, body=brevo_python.Body16(text="edited <live>"))
            eq(u.text, "edited <live>", "SDK text after edit")
            msg = frame_message(await vs.expect("messageUpdated", "the edit of %s" % m.id), "messageUpdated")
            eq(msg.get("id"), m.id, "messageUpdated message.id")
            eq(msg.get("text"), "edited <live>", "messageUpdated message.text")
            eq(msg.get("createdAt"), m.created_at, "messageUpdated message.createdAt")
            await sdk(API.conversations_messages_id_delete, m.id)
            f = await vs.expect("messageDeleted", "the deletion of %s" % m.id)
            eq(f.get("messageId"), m.id, "messageDeleted messageId")
    run(scenario())


@test
def ws_sdk_pushed_message_arrives():
    s = widget_session()
    vid, token = s["visitorId"], s["token"]

    async def scenario():
        async with visitor_socket(token) as vs:
            await vs.expect("ready")
            p = await sdk(push, "Your order <42> has shipped", visitor_id=vid, agent_id=AGENT_ID)
            eq(p.is_pushed, True, "SDK is_pushed")
            msg = frame_message(await vs.expect("messageCreated", "the pushed message %s" % p.id), "messageCreated")
            eq(msg.get("id"), p.id, "frame message.id vs the SDK's id")
            eq(msg.get("text"), "Your order <42> has shipped", "frame message.text")
            check(msg.get("isPushed") is True, "frame message.isPushed is %r, not true" % (msg.get("isPushed"),))
            eq(msg.get("visitorId"), vid, "frame message.visitorId")
    run(scenario())


@test
def widget_visitor_message_readable_with_sdk():
    s = widget_session()
    vid, token = s["visitorId"], s["token"]
    text = "a question from the visitor <b>?</b>"
    status, body, _ = widget_http("POST", "/messages", {"text": text}, token=token)
    check(status == 200, "POST /widget/v1/{widgetId}/messages -> %d %r" % (status, body))
    check(isinstance(body, dict) and ID_RE.match(body.get("id") or ""), "message id in %r" % (body,))
    eq(body.get("type"), "visitor", "widget answer type")
    # GET /v3/conversations/messages/{id} serves visitor messages too
    g = API.conversations_messages_id_get(body["id"])
    check(isinstance(g, brevo_python.ConversationsMessage), "GET result type %s" % type(g).__name__)
    eq(g.id, body["id"], "SDK id")
    eq(g.type, "visitor", "SDK type")
    eq(g.text, text, "SDK text")
    eq(g.visitor_id, vid, "SDK visitor_id")
    check_created_at(g.created_at)
    raw = last_json()
    no_nulls(raw)
    eq(raw, body, "SDK GET body vs the widget's answer")
    # no token: 401 unauthorized
    status, body, _ = widget_http("POST", "/messages", {"text": "no token"})
    eq(status, 401, "status without a token")
    eq((body or {}).get("code"), "unauthorized", "code without a token")


@test
def ws_reconnect_after_replays_exactly_the_missed():
    s = widget_session()
    vid, token = s["visitorId"], s["token"]

    async def scenario():
        async with visitor_socket(token) as vs:
            await vs.expect("ready")
            m1 = await sdk(send, "seen before going away", visitor_id=vid)
            f1 = await vs.expect("messageCreated", "the message %s" % m1.id)
            eq(frame_message(f1, "messageCreated").get("id"), m1.id, "message.id")
        # disconnected: two more messages
        m2 = await sdk(send, "while away 1", visitor_id=vid)
        m3 = await sdk(send, "while away 2", visitor_id=vid)
        async with visitor_socket(token, after=m1.id) as vs:
            f2 = await vs.expect("messageCreated", "the replay of %s" % m2.id)
            eq(frame_message(f2, "messageCreated").get("id"), m2.id, "first replayed message.id")
            eq(f2["message"].get("text"), "while away 1", "first replayed message.text")
            check(f2["cursor"] > f1["cursor"], "replayed cursor %d not after %d" % (f2["cursor"], f1["cursor"]))
            f3 = await vs.expect("messageCreated", "the replay of %s" % m3.id)
            eq(frame_message(f3, "messageCreated").get("id"), m3.id, "second replayed message.id")
            eq(f3["message"].get("text"), "while away 2", "second replayed message.text")
            ready = await vs.expect("ready", "ready after the replay of %s and %s" % (m2.id, m3.id))
            eq(ready["cursor"], f3["cursor"], "ready cursor (the last one replayed)")
            await vs.expect_silence(1.0)
    run(scenario())


@test
def widget_identity_binding():
    uid = "compat-user-%s" % RUN
    s = widget_session(visitorId=uid, visitorHash=identity_hash(uid))
    eq(s["visitorId"], uid, "bound visitorId")
    good = identity_hash(uid)
    wrong = (
        identity_hash(uid, key=IDENTITY_KEY + "x"),  # another key
        identity_hash(uid + "x"),                    # another visitor's hash
        good[:-1] + ("0" if good[-1] != "0" else "1"),
    )
    for bad in wrong:
        status, body, _ = widget_http("POST", "/session", {"visitorId": uid, "visitorHash": bad})
        eq(status, 401, "status with wrong visitorHash %s (body %r)" % (bad, body))
        eq((body or {}).get("code"), "unauthorized", "code with a wrong visitorHash")
    status, body, _ = widget_http("POST", "/session", {"visitorId": uid})
    eq(status, 401, "status without visitorHash (body %r)" % (body,))
    eq((body or {}).get("code"), "unauthorized", "code without visitorHash")

    # the bound visitor's socket gets what the SDK sends to that visitorId
    async def scenario():
        async with visitor_socket(s["token"]) as vs:
            await vs.expect("ready")
            m = await sdk(send, "hello, known user", visitor_id=uid)
            msg = frame_message(await vs.expect("messageCreated", "the message %s" % m.id), "messageCreated")
            eq(msg.get("id"), m.id, "frame message.id")
            eq(msg.get("visitorId"), uid, "frame message.visitorId")
    run(scenario())


@test
def ws_bad_token_is_refused_401():
    widget_env()

    async def scenario():
        try:
            async with visitor_socket("not-a-token-" + RUN):
                pass
        except websockets.InvalidStatus as e:
            eq(e.response.status_code, 401, "handshake status with a bad token")
            return
        raise Failure("the socket opened with a bad token")
    run(scenario())


def _sdk_version():
    try:
        from importlib.metadata import version
        return version("brevo-python")
    except Exception:  # noqa: BLE001
        return "?"


def main():
    missing = [n for n in ("SWITCHBOARD_API_KEY", "SWITCHBOARD_AGENT_ID", "SWITCHBOARD_AGENT2_ID",
                           "SWITCHBOARD_GROUP_ID") if not os.environ.get(n)]
    if missing:
        print("missing environment: %s" % ", ".join(missing))
        print("0 passed, 1 failed")
        return 1
    passed = failed = 0
    print("brevo-python %s against %s" % (_sdk_version(), URL))
    for fn in TESTS:
        name = fn.__name__
        try:
            fn()
        except Failure as e:
            failed += 1
            print("FAIL %s: %s" % (name, e))
        except ApiException as e:
            failed += 1
            print("FAIL %s: unexpected ApiException %s %s body=%r" % (name, e.status, e.reason, e.body))
        except Exception as e:  # noqa: BLE001 - report anything the SDK raised
            failed += 1
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e))
            traceback.print_exc(limit=3, file=sys.stdout)
        else:
            passed += 1
            print("ok   %s" % name)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
