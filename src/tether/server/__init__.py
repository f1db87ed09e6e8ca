"""The one-process server: composes the core (identity, audit, store) and serves the JSON API.

This package is a composition root: it may import every part; no core part imports it.
"""
