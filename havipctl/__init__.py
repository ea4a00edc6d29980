"""havipctl: the command-line client of the HAVIP control plane.

A client, not a part of any service: it speaks the allocator's public HTTP API (docs/contract.md#http-api,
`/openapi.json`) and reads the public event stream (docs/contract.md#events, `docs/events/`), and imports nothing
from `services` or `shared` (tests/unit/test_havipctl_layout.py enforces it).
"""
