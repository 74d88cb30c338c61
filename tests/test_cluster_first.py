"""`parallel.cluster_first` over two nodes of two processes each, simulated on this machine: who
fills a cache directory the nodes share, who fills node-local ones, and what a failing step does
to the ranks waiting for it."""

from __future__ import annotations

import json

import pytest

from tests.torchrun import DIST_DIR, launch_nodes

pytestmark = pytest.mark.slow


def test_rank_0_fills_a_shared_cache_and_each_node_its_own(tmp_path):
    launch_nodes(2, 2, DIST_DIR / "cluster_first.py", tmp_path, timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    # Ranks 0, 1 are node 0's, ranks 2, 3 node 1's.
    assert [r["shared"] for r in results] == ["filled", "read", "read", "read"]
    assert [r["local"] for r in results] == ["filled", "read", "filled", "read"]
    assert [(tmp_path / f"node{n}" / "entry").read_text() for n in (0, 1)] == ["0", "2"]
    # Rank 0's error stops every rank, with its message; no other rank runs the step.
    assert [r["failing"] for r in results] == ["DataError: d.jsonl:3: not valid JSON"] * 4
