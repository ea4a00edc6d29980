"""havipctl: the command-line client of the HAVIP control plane.

A client, not a part of any service: it speaks the allocator's public HTTP API (SPEC §3, `/openapi.json`)
and reads the public event stream (SPEC §6, `docs/events/`), and imports nothing from `services` or `shared`
(tests/unit/test_havipctl_layout.py enforces it).
"""
