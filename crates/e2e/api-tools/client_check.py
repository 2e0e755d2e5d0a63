"""Drives bangerd through a client generated from docs/openapi.json by
openapi-python-client: lists, creates (start: false), reads and deletes a
VM. Usage: client_check.py GENERATED_DIR SOCKET VM_NAME IMAGE

Prints one line per step; exits non-zero (with the reason) on any mismatch.
"""

import json
import sys

import httpx

generated, socket, name, image = sys.argv[1:5]
sys.path.insert(0, generated)

from banger_client import Client  # noqa: E402
from banger_client.api.default import (  # noqa: E402
    create_vm,
    delete_vm,
    get_vm,
    list_vms,
)
from banger_client.models import ApiError, CreateVmRequest, VmRecord  # noqa: E402


def check(cond, what):
    if not cond:
        sys.exit(f"client_check: {what}")


client = Client(
    base_url="http://bangerd",
    httpx_args={"transport": httpx.HTTPTransport(uds=socket)},
    # The NDJSON 200 of create is not modelled by the generator: it reads
    # `.content` itself below.
    raise_on_unexpected_status=False,
)

before = list_vms.sync(client=client)
check(isinstance(before, list), f"list_vms gave {before!r}")
check(all(isinstance(v, VmRecord) for v in before), "list_vms items are not VmRecords")
check(name not in [v.name for v in before], f"{name} exists before the test")
print(f"list: {len(before)} VMs")

# create answers with NDJSON events (the generator leaves such bodies to
# the caller): the last one is `done` with the VM record.
resp = create_vm.sync_detailed(
    client=client, body=CreateVmRequest(name=name, image=image, start=False)
)
check(resp.status_code == 200, f"create_vm: {resp.status_code} {resp.content!r}")
events = [json.loads(line) for line in resp.content.splitlines() if line.strip()]
check(events and "done" in events[-1], f"create_vm ended with {events[-1:]!r}")
created = VmRecord.from_dict(events[-1]["done"])
check(created.name == name and created.state == "stopped", f"created {created!r}")
print(f"create: {created.name} {created.state}")

got = get_vm.sync(client=client, vm=name)
check(isinstance(got, VmRecord), f"get_vm gave {got!r}")
check(got.id == created.id and got.image == image, f"get_vm gave {got!r}")
print(f"read: {got.name} {got.id}")

# A second create of the same name is refused before anything is made,
# with the daemon's one error shape.
dup = create_vm.sync_detailed(
    client=client, body=CreateVmRequest(name=name, image=image, start=False)
)
check(dup.status_code == 409, f"duplicate create: {dup.status_code} {dup.content!r}")
check(isinstance(dup.parsed, ApiError) and dup.parsed.code == "conflict", f"{dup.parsed!r}")
print(f"duplicate: {dup.status_code} {dup.parsed.code}: {dup.parsed.message}")

deleted = delete_vm.sync(client=client, vm=name)
check(isinstance(deleted, VmRecord) and deleted.id == created.id, f"delete_vm gave {deleted!r}")
print(f"delete: {deleted.name}")

gone = get_vm.sync_detailed(client=client, vm=name)
check(gone.status_code == 404, f"get after delete: {gone.status_code}")
check(isinstance(gone.parsed, ApiError) and gone.parsed.code == "not_found", f"{gone.parsed!r}")
after = list_vms.sync(client=client)
check([v.name for v in after] == [v.name for v in before], "list after delete differs from before")
print("gone: 404 not_found")
