"""Library hooks (installed as meshpatch.hooks)."""
