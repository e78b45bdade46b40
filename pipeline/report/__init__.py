"""Inspecting a run: the static HTML report of a run directory (``page``)."""
