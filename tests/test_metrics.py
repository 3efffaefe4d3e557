"""reclora.metrics against brute-force definitions on random data with ties."""

from __future__ import annotations

import numpy as np
import pytest

from reclora import metrics


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).sum() / (pos.size * neg.size))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    # Few distinct values so that ties are frequent, both within and across classes.
    s = rng.integers(0, 7, n).astype(float) + 0.3 * y
    assert metrics.auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert metrics.auc([0, 1], [0.1, 0.9]) == 1.0
    assert metrics.auc([0, 1], [0.9, 0.1]) == 0.0
    assert metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores must have shape"):
        metrics.auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="labels must hold only 0 and 1"):
        metrics.auc([0, 2], [0.1, 0.2])


def test_logloss_and_accuracy() -> None:
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.4, 0.5])
    expected = -np.mean(np.log([0.9, 0.8, 0.4, 0.5]))
    assert metrics.logloss(y, p) == pytest.approx(expected)
    # Clipping keeps a confident mistake finite: -log(1e-7) = 16.1.
    assert metrics.logloss([1], [0.0]) == pytest.approx(-np.log(1e-7))
    assert metrics.logloss([0], [1.0]) == pytest.approx(-np.log(1e-7))  # both ends clipped
    assert metrics.logloss([0, 1], [1.0, 1.0]) == pytest.approx(-np.log(1e-7) / 2, rel=1e-6)
    assert metrics.accuracy(y, p) == pytest.approx(0.5)  # 0.5 >= 0.5 predicts 1
    with pytest.raises(ValueError, match="probs must lie in"):
        metrics.logloss([1, 0], [1.5, 0.2])
    out = metrics.evaluate(y, p)
    assert set(out) == {"auc", "logloss", "accuracy", "n"} and out["n"] == 4


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(y * 0.8 + rng.normal(size=n), 1)  # rounding makes ties


def test_bootstrap_interval_contains_point_and_shrinks() -> None:
    widths = []
    for n in (200, 5000):
        y, s = _planted(n, 1)
        ci = metrics.bootstrap_auc(y, s, n_resamples=400, seed=3)
        assert ci.low <= ci.auc <= ci.high
        assert ci.n_resamples == 400
        widths.append(ci.high - ci.low)
    # The width falls like 1/sqrt(n): 25x the samples, about 1/5 the width.
    assert widths[1] < 0.35 * widths[0]


def test_bootstrap_is_seeded_and_matches_a_loop() -> None:
    y, s = _planted(300, 2)
    a = metrics.bootstrap_auc(y, s, n_resamples=100, seed=7)
    b = metrics.bootstrap_auc(y, s, n_resamples=100, seed=7)
    assert a == b
    # The vectorised weights equal plain resampling with the same index draws.
    boot = metrics._resampled_aucs(y, [s], 100, seed=7)[0]
    rng = np.random.default_rng(7)
    loop = []
    for start in range(0, 100, metrics._BOOTSTRAP_CHUNK):
        r = min(metrics._BOOTSTRAP_CHUNK, 100 - start)
        for idx in rng.integers(0, y.size, size=(r, y.size)):
            loop.append(_brute_auc(y[idx], s[idx]))
    np.testing.assert_allclose(boot, loop, atol=1e-12)


def test_paired_bootstrap_separates_real_and_null_differences() -> None:
    rng = np.random.default_rng(4)
    n = 3000
    y = rng.integers(0, 2, n)
    strong = y * 1.0 + rng.normal(size=n)
    weak = y * 0.3 + rng.normal(size=n)
    d = metrics.paired_bootstrap_auc(y, strong, weak, n_resamples=300)
    assert d.diff > 0 and d.significant and d.p_value < 0.01
    assert d.low <= d.diff <= d.high
    # A model against a monotone transform of itself: identical AUC, zero-width interval.
    same = metrics.paired_bootstrap_auc(y, strong, 2 * strong + 1, n_resamples=50)
    assert same.diff == 0.0 and not same.significant


def _brute_spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(v: np.ndarray) -> np.ndarray:  # mean of 1-based positions among equal values
        return np.array([(v < x).sum() + ((v == x).sum() + 1) / 2 for x in v])

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@pytest.mark.parametrize("seed", range(4))
def test_rank_correlation_matches_pearson_on_average_ranks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    a = rng.integers(0, 6, n).astype(float)  # many ties
    b = a + rng.normal(0, 2.0, n) * (seed % 2)  # seed 0, 2: b == a
    assert metrics.rank_correlation(a, b) == pytest.approx(_brute_spearman(a, b), abs=1e-12)


def test_rank_correlation_edge_cases() -> None:
    x = np.arange(10.0)
    assert metrics.rank_correlation(x, x**3) == pytest.approx(1.0)
    assert metrics.rank_correlation(x, -x) == pytest.approx(-1.0)
    assert np.isnan(metrics.rank_correlation(x, np.ones(10)))
    with pytest.raises(ValueError, match="b must have shape"):
        metrics.rank_correlation(x, x[:3])
    with pytest.raises(ValueError, match="a must be 1-d"):
        metrics.rank_correlation([1.0], [1.0])
    with pytest.raises(ValueError, match="a holds NaN"):
        metrics.rank_correlation([np.nan, 1.0], [1.0, 2.0])


@pytest.mark.parametrize("seed", range(4))
def test_auc_with_cross_class_ties(seed: int) -> None:
    """Positives and negatives share scores (the case where the 1/2 of a tie matters)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 300))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.integers(0, 4, n).astype(float) + rng.integers(0, 2, n) * y  # few values
    s[:2] = 2.0  # at least one positive-negative tie
    shared = np.intersect1d(s[y == 1], s[y == 0])
    assert shared.size >= 2, "the data must hold ties across classes"
    assert metrics.auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
    # All tied: exactly one half, whatever the class balance.
    assert metrics.auc(y, np.full(n, 0.3)) == 0.5


def _loop_resamples(y: np.ndarray, score_sets: list[np.ndarray], n_resamples: int,
                    seed: int) -> np.ndarray:
    """Brute force: the same index draws as metrics (rng.integers per chunk of resamples),
    each resample's AUC by pairwise counting; NaN for a one-class resample."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_resamples, metrics._BOOTSTRAP_CHUNK):
        r = min(metrics._BOOTSTRAP_CHUNK, n_resamples - start)
        for idx in rng.integers(0, y.size, size=(r, y.size)):
            yy = y[idx]
            out.append([_brute_auc(yy, s[idx]) if 0 < yy.sum() < yy.size else np.nan
                        for s in score_sets])
    return np.array(out).T


@pytest.mark.parametrize("level", [0.95, 0.9, 0.5])
def test_bootstrap_interval_is_the_percentiles_of_the_resamples(level: float) -> None:
    """low/high are np.quantile of the resampled AUCs at (1-level)/2 and 1-(1-level)/2."""
    y, s = _planted(120, 5)
    ci = metrics.bootstrap_auc(y, s, n_resamples=200, level=level, seed=11)
    boot = _loop_resamples(y, [s], 200, 11)[0]
    boot = boot[np.isfinite(boot)]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    assert (ci.low, ci.high) == pytest.approx((lo, hi), abs=1e-12)
    assert ci.auc == pytest.approx(_brute_auc(y, s), abs=1e-12)
    assert ci.level == level and ci.n_resamples == boot.size


def test_bootstrap_drops_one_class_resamples() -> None:
    """Resamples holding one class have no AUC: dropped, and counted out of n_resamples."""
    y = np.array([1] + [0] * 9)
    s = np.linspace(0, 1, 10)
    ci = metrics.bootstrap_auc(y, s, n_resamples=300, seed=2)
    boot = _loop_resamples(y, [s], 300, 2)[0]
    assert 0 < ci.n_resamples == int(np.isfinite(boot).sum()) < 300


@pytest.mark.parametrize("seed", range(3))
def test_paired_bootstrap_matches_its_definition(seed: int) -> None:
    """diff, interval and the two-sided p-value = min(1, 2 * min(P(d <= 0), P(d >= 0)))
    over the paired resampled differences, computed by brute force; two close models so
    the p-value is strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    n = 150
    y = rng.integers(0, 2, n)
    a = np.round(y * 0.6 + rng.normal(size=n), 1)
    b = np.round(y * 0.5 + rng.normal(size=n), 1)
    d = metrics.paired_bootstrap_auc(y, a, b, n_resamples=300, level=0.9, seed=seed)
    boot = _loop_resamples(y, [a, b], 300, seed)
    diffs = boot[0] - boot[1]
    diffs = diffs[np.isfinite(diffs)]
    lo, hi = np.quantile(diffs, [0.05, 0.95])
    p = min(1.0, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    assert d.diff == pytest.approx(_brute_auc(y, a) - _brute_auc(y, b), abs=1e-12)
    assert (d.low, d.high) == pytest.approx((lo, hi), abs=1e-12)
    assert 0.0 < p < 1.0
    assert d.p_value == pytest.approx(p, abs=1e-12)
    assert d.significant == (lo > 0 or hi < 0)
    assert d.as_dict()["significant"] == d.significant


def _loop_cluster_resamples(y: np.ndarray, score_sets: list[np.ndarray], users: np.ndarray,
                            n_resamples: int, seed: int) -> np.ndarray:
    """The user-clustered bootstrap by hand: draw as many users as there are, with
    replacement, and pool all their samples (a user drawn twice brings its samples twice)."""
    members = [np.flatnonzero(users == u) for u in np.unique(users)]
    rng = np.random.default_rng(seed)
    chunk = metrics._BOOTSTRAP_CHUNK
    out = []
    for start in range(0, n_resamples, chunk):
        draws = rng.integers(0, len(members), size=(min(chunk, n_resamples - start),
                                                     len(members)))
        for row in draws:
            take = np.concatenate([members[u] for u in row])
            yy = y[take]
            out.append([_brute_auc(yy, s[take]) if 0 < yy.sum() < yy.size else np.nan
                        for s in score_sets])
    return np.array(out).T


def _clustered(n_users: int, per_user: int, seed: int):
    """Samples from few users, each user with its own offset (correlated within a user)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(rng.permutation(1000)[:n_users] * 7, per_user)  # ids not 0..G-1
    bias = rng.normal(size=n_users).repeat(per_user)
    y = (rng.random(users.size) < 1 / (1 + np.exp(-2 * bias))).astype(np.int64)
    a = np.round(bias + 0.5 * y + rng.normal(size=users.size), 1)
    b = np.round(bias + 0.3 * y + rng.normal(size=users.size), 1)
    order = rng.permutation(users.size)  # users' samples interleaved
    return users[order], y[order], a[order], b[order]


@pytest.mark.parametrize("seed", range(2))
def test_user_clustered_bootstrap_matches_a_loop_over_users(seed: int) -> None:
    """groups=: whole users resampled; interval, paired interval and p-value equal the
    brute-force loop that pools each drawn user's samples."""
    users, y, a, b = _clustered(12, 9, seed)
    ci = metrics.bootstrap_auc(y, a, n_resamples=120, seed=seed, groups=users)
    boot = _loop_cluster_resamples(y, [a, b], users, 120, seed)
    fin = boot[0][np.isfinite(boot[0])]
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(fin, [0.025, 0.975])),
                                              abs=1e-12)
    assert ci.auc == pytest.approx(_brute_auc(y, a), abs=1e-12)
    d = metrics.paired_bootstrap_auc(y, a, b, n_resamples=120, seed=seed, groups=users)
    diffs = boot[0] - boot[1]
    diffs = diffs[np.isfinite(diffs)]
    p = min(1.0, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    assert (d.low, d.high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])),
                                            abs=1e-12)
    assert d.p_value == pytest.approx(p, abs=1e-12)


def test_user_clustered_bootstrap_is_wider_than_per_sample() -> None:
    """Copies of each sample under one user: the clustered interval equals the per-sample
    interval of the data without copies, while resampling the copies one by one would
    claim a far narrower one (the mistake the groups= option exists for)."""
    rng = np.random.default_rng(3)
    y0 = rng.integers(0, 2, 80)
    s0 = np.round(y0 * 0.7 + rng.normal(size=80), 1)
    y, s, users = np.repeat(y0, 5), np.repeat(s0, 5), np.repeat(np.arange(80), 5)
    plain = metrics.bootstrap_auc(y0, s0, n_resamples=300, seed=4)
    grouped = metrics.bootstrap_auc(y, s, n_resamples=300, seed=4, groups=users)
    naive = metrics.bootstrap_auc(y, s, n_resamples=300, seed=4)
    assert (grouped.low, grouped.high) == pytest.approx((plain.low, plain.high), abs=1e-12)
    assert naive.high - naive.low < 0.6 * (grouped.high - grouped.low)
    with pytest.raises(ValueError, match="groups"):
        metrics.bootstrap_auc(y, s, groups=users[:-1])


def test_bootstrap_with_no_usable_resample_says_so() -> None:
    """Every resample of two samples drawn once may hold one class: a clear error, not
    numpy's IndexError from an empty quantile."""
    with pytest.raises(ValueError, match="single class"):
        metrics.bootstrap_auc([0, 1], [0.1, 0.2], n_resamples=1, seed=0)
    with pytest.raises(ValueError, match="single class"):
        metrics.paired_bootstrap_auc([0, 1], [0.1, 0.2], [0.2, 0.1], n_resamples=1, seed=0)
