"""The Grafana dashboard of the HAVIP control plane, generated as code (see README.md here)."""
