"""The quality harness learns: on digits, one epoch of the single-process reference beats the untrained stack."""

from __future__ import annotations

from benchmarks.quality import evaluate_preset, ring_score, table

import numpy as np


def test_reference_beats_untrained_on_digits():
    rows = evaluate_preset("digits", [], epochs=1, rows=("untrained", "reference"))
    untrained, reference = rows["untrained"], rows["reference"]
    for scorer in ("nc", "knn"):
        assert reference[scorer] > untrained[scorer], (scorer, rows)
    assert "| digits | reference |" in table({"digits": rows})


def test_ring_score_tells_a_ring_from_a_line():
    az = np.repeat(np.arange(0, 360, 20.0), 3)  # 18 azimuths, 3 samples each
    rad = np.radians(az)
    ring = np.column_stack([np.cos(rad), np.sin(rad)])
    line = np.column_stack([az, np.zeros_like(az)])  # 0 and 340 at the two ends: not closed
    assert ring_score(ring, az) == 1.0
    assert ring_score(line, az) == 16 / 18
