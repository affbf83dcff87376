"""Inbound: end users' own opt-outs that arrive from outside the source (a STOP reply)."""
