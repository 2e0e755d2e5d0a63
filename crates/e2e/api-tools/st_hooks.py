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
"""

import schemathesis


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
