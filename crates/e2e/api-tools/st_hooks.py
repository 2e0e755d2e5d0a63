"""Schemathesis hooks for crates/e2e/tests/api.rs.

They keep the fuzzer's requests to what a test on this machine may do,
without weakening any check:

- `POST /v1/vms` never boots a guest (`start` is forced to false) and never
  asks for an ephemeral VM, whose response stream stays open until the
  client goes away by design. Booting a guest takes 20-60 s under TCG.
- `GET /v1/vms/{vm}/logs` never follows: a followed log streams until the
  VM is deleted, by design.

Only positive values are replaced: a negative case (a wrong type or an
unknown value for these fields) is sent as generated.

It also teaches schemathesis the NDJSON streams of long operations: every
line of such a response must be an event of the documented schema
(checked here), and the last one is handed on to the response-schema check.
"""

import json
import os

import schemathesis
from jsonschema import Draft202012Validator

DOC = json.load(open(os.environ["BANGER_OPENAPI"]))


@schemathesis.deserializer("application/x-ndjson")
def ndjson(ctx, response):
    op = ctx.operation
    content = DOC["paths"][op.path][op.method.lower()]["responses"][str(response.status_code)]["content"]
    schema = dict(content["application/x-ndjson"]["schema"], components=DOC["components"])
    validator = Draft202012Validator(schema)
    events = []
    # Blank lines are the stream's keep-alives.
    for line in response.content.splitlines():
        if not line.strip():
            continue
        event = json.loads(line)
        errors = sorted(validator.iter_errors(event), key=str)
        if errors:
            raise ValueError(f"stream event {event!r} does not match the document: {errors[0].message}")
        events.append(event)
    if not events:
        raise ValueError("the stream has no events")
    return events[-1]


@schemathesis.hook
def before_call(context, case, kwargs):
    path = case.operation.path
    method = case.operation.method.upper()
    if method == "POST" and path == "/v1/vms" and isinstance(case.body, dict):
        if case.body.get("start", True) is True:
            case.body["start"] = False
        if case.body.get("ephemeral") is True:
            case.body["ephemeral"] = False
    if method == "GET" and path == "/v1/vms/{vm}/logs" and isinstance(case.query, dict):
        if case.query.get("follow") in (True, "true"):
            case.query["follow"] = "false"
