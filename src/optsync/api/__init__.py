"""Pinpoint-compatible HTTP API."""
