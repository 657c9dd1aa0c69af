"""Routing: per-target config (listener → route → clusters → endpoints) and load balancing."""
