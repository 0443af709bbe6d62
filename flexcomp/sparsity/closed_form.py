"""Closed-form kv ranges per q tile (placeholder)."""

from __future__ import annotations


def closed_form_bounds(mod):
    return None
