"""Reusable helpers for meshpatch tests (real servers, real xDS; no mocks)."""
