"""Deployment artefacts; Python only where an artefact is generated (the Grafana dashboard)."""
