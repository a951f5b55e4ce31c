"""The paper's own numbers, from a search space's ``paper:`` block."""

from __future__ import annotations

from orchestrator import search_space as spaces


# ------------------------------------------------------------------------------ paper


def paper_datasets(space: spaces.SearchSpace) -> list[str]:
    paper = space.paper or {}
    found = set((paper.get("default") or {}))
    for block in (paper.get("rows") or {}).values():
        found.update(block or {})
    return sorted(found)


def paper_value(space: spaces.SearchSpace, dataset: str, row: str, key: str, default: str | None, absolute: bool) -> float | None:
    """The paper's number for a row: as printed (``absolute=False``: a Δ where the paper
    gives Δs), or absolute (a Δ added to the paper's default row)."""
    paper = space.paper or {}
    reported = ((paper.get("rows") or {}).get(row) or {}).get(dataset, {}) or {}
    base = ((paper.get("default") or {}).get(dataset) or {}).get(key)
    value = reported.get(key)
    if row == default or space.is_benchmark:
        return value if value is not None else base if row == default else None
    if value is None or not paper.get("delta") or not absolute:
        return value
    return None if base is None else base + value
