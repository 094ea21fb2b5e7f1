"""The calibrated length distribution and its Gittins index (pure Python, no torch)."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltr.scheduling.length_distribution import (
    SHIPPED_PATH,
    LengthDistribution,
    fit_length_distribution,
    gittins_remaining,
    load_distribution,
)

lengths = st.lists(st.integers(min_value=1, max_value=4000), min_size=2, max_size=12)


def test_known_size_gives_exactly_the_remaining_tokens() -> None:
    # A point mass (all quantiles equal) is a known size: 1 / index = remaining work, i.e. SRPT.
    assert gittins_remaining([300.0, 300.0, 300.0], 0.0) == pytest.approx(300.0)
    assert gittins_remaining([300.0, 300.0, 300.0], 120.0) == pytest.approx(180.0)
    assert gittins_remaining([300.0, 300.0], 300.0) == math.inf


def test_two_point_size_matches_the_hand_computed_index() -> None:
    # Uniform on [10, 20] with mass 1/2 and [20, 1000] with 1/2 (quantiles 10, 20, 1000), none served.
    # Stop at 20: P = 1/2, E[min(S, 20)] = 1/2 * 15 + 1/2 * 20 = 17.5 -> 35 per completion.
    # Stop at 1000: P = 1, E[S] = 7.5 + 255 = 262.5 -> 262.5. The index takes the best: 35.
    assert gittins_remaining([10.0, 20.0, 1000.0], 0.0) == pytest.approx(35.0)


@settings(max_examples=200, deadline=None)
@given(lengths, st.floats(min_value=1.0, max_value=5.0), st.integers(min_value=0, max_value=400))
def test_index_is_monotone_in_the_predicted_distribution(sizes: list[int], scale: float, shift: int) -> None:
    # A stochastically larger size (every quantile scaled up and shifted) never gets a better index when
    # nothing has been served, and scaling every size scales the remaining work (tokens are the unit).
    small = sorted(float(s) for s in sizes)
    large = [x * scale + shift for x in small]
    for per_token in (False, True):
        assert gittins_remaining(large, 0.0, per_token) >= gittins_remaining(small, 0.0, per_token) * (1 - 1e-9)
    assert gittins_remaining([x * scale for x in small], 0.0) == pytest.approx(scale * gittins_remaining(small, 0.0))


def _table() -> LengthDistribution:
    # Bin 0: mostly short (quantiles 1..40); bin 1: long (300..900); pooled: the mix, tail to 4000.
    return LengthDistribution(edges=(0.0,), bins=((1.0, 10.0, 20.0, 40.0), (300.0, 500.0, 700.0, 900.0)),
                              pooled=(1.0, 20.0, 300.0, 700.0, 4000.0))


def test_a_request_that_outlives_its_prediction_loses_priority() -> None:
    table = _table()
    fresh_short, fresh_long = table.effective_remaining(0, 0.0), table.effective_remaining(1, 0.0)
    assert fresh_short < fresh_long
    # Past its short bin's largest length the request follows the pooled tail: its expected remaining work
    # is far above a fresh short request's and above a fresh long one's, so fresh work goes first.
    outlived = table.effective_remaining(0, 40.0)
    assert outlived > fresh_long > fresh_short
    assert table.remaining(-1.0, 40) > table.remaining(-1.0, 0)
    # A long prediction that has run a while gets better, as its remaining work shrinks (known-ish size).
    assert table.effective_remaining(1, 700.0) < fresh_long
    # Past everything known, nothing is promised: last.
    assert table.effective_remaining(0, 4000.0) == math.inf


def test_remaining_and_quantile_queries() -> None:
    table = _table()
    # Uniform between quantiles: mean of bin 1 = (400 + 600 + 800) / 3.
    assert table.remaining(1.0, 0) == pytest.approx(600.0)
    # Given S > 600: [600, 700] keeps half its 1/3, [700, 900] all of its 1/3 -> weights 1/3, 2/3.
    assert table.remaining(1.0, 600) == pytest.approx(650 / 3 + 2 * 800 / 3 - 600)
    assert table.remaining(None, 0) == pytest.approx(sum((a + b) / 2 for a, b in zip(table.pooled, table.pooled[1:])) / 4)
    assert table.quantile(1.0, 0.5) == pytest.approx(600.0)
    assert table.quantile(-3.0, 1.0) == 40.0
    assert table.bin_of(None) is None and table.bin_of(-0.1) == 0 and table.bin_of(0.0) == 1
    assert table.boundaries(0) == (1.0, 10.0, 20.0, 40.0, 300.0, 700.0, 4000.0)


def test_fit_recovers_bins_and_quantiles() -> None:
    rng = random.Random(0)
    scores = [rng.random() for _ in range(2000)]
    lens = [int(10 + 1000 * s * rng.random()) + 1 for s in scores]   # higher score, longer
    dist = fit_length_distribution(scores, lens, num_bins=4, levels_per_bin=8, pooled_levels=16)
    assert len(dist.bins) == 4 and len(dist.edges) == 3
    assert all(len(b) == 9 for b in dist.bins) and len(dist.pooled) == 17
    assert dist.edges == pytest.approx([0.25, 0.5, 0.75], abs=0.05)
    medians = [b[4] for b in dist.bins]
    assert medians == sorted(medians) and medians[-1] > 3 * medians[0]
    assert dist.pooled[0] == min(lens) and dist.pooled[-1] == max(lens)
    assert LengthDistribution.from_mapping(json.loads(json.dumps(dist.to_mapping()))) == dist


def test_scaled_table_describes_cut_and_capped_answers() -> None:
    # The scheduler benchmark serves max_tokens = min(max(1, round(length / 4)), 128): the scaled table's
    # quantiles are the quantiles of those served lengths, so the same transform of every entry.
    table = _table()
    scaled = table.scaled(4, 128)
    assert scaled.edges == table.edges
    assert scaled.bins == ((1.0, 2.0, 5.0, 10.0), (75.0, 125.0, 128.0, 128.0))
    assert scaled.pooled == tuple(min(max(1.0, round(v / 4)), 128) for v in table.pooled)
    assert scaled.quantile(1.0, 0.5) == 126.5
    with pytest.raises(ValueError, match="scale"):
        table.scaled(0, 128)


def test_bad_tables_are_rejected() -> None:
    with pytest.raises(ValueError, match="edges need"):
        LengthDistribution(edges=(0.0,), bins=((1.0, 2.0),), pooled=(1.0,))
    with pytest.raises(ValueError, match="ascending"):
        LengthDistribution(edges=(), bins=((5.0, 2.0),), pooled=(1.0,))
    with pytest.raises(ValueError, match="edges, bins and pooled"):
        LengthDistribution.from_mapping({"edges": []})
    with pytest.raises(ValueError, match="at least"):
        fit_length_distribution([0.0] * 5, [1] * 5, num_bins=10)


def test_shipped_distribution_is_calibrated_from_the_validation_split() -> None:
    data = json.loads(SHIPPED_PATH.read_text())
    assert data["command"].startswith("python -m ltr.predictor.length_distribution")
    dist = load_distribution()
    # Higher score = longer: the median length rises from the lowest-score bin to the highest.
    assert dist.quantile(dist.edges[0] - 1, 0.5) * 3 < dist.quantile(dist.edges[-1] + 1, 0.5)
    assert dist.pooled[-1] >= max(b[-1] for b in dist.bins)
