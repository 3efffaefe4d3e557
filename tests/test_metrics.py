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


def _interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval by its definition: of the R usable values, the m-th smallest
    and the m-th largest, m = floor((R + 1) * (1 - level) / 2)."""
    boot = np.sort(boot[np.isfinite(boot)])
    m = int(np.floor((boot.size + 1) * (1.0 - level) / 2.0 + 1e-9))
    assert m >= 1
    return boot[m - 1], boot[-m]


def _p_value(diffs: np.ndarray) -> float:
    """Two-sided add-one bootstrap p-value over the usable resampled differences."""
    diffs = diffs[np.isfinite(diffs)]
    tail = min((diffs <= 0).sum(), (diffs >= 0).sum())
    return min(1.0, 2.0 * (tail + 1) / (diffs.size + 1))


@pytest.mark.parametrize("level", [0.95, 0.9, 0.5])
def test_bootstrap_interval_is_the_percentiles_of_the_resamples(level: float) -> None:
    """low/high are the order statistics of the resampled AUCs (see _interval)."""
    y, s = _planted(120, 5)
    ci = metrics.bootstrap_auc(y, s, n_resamples=200, level=level, seed=11)
    boot = _loop_resamples(y, [s], 200, 11)[0]
    boot = boot[np.isfinite(boot)]
    assert (ci.low, ci.high) == pytest.approx(_interval(boot, level), abs=1e-12)
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
    """diff, interval and the two-sided add-one p-value (see _p_value) over the paired
    resampled differences, computed by brute force; two close models so the p-value is
    strictly between its floor and 1."""
    rng = np.random.default_rng(seed)
    n = 150
    y = rng.integers(0, 2, n)
    a = np.round(y * 0.6 + rng.normal(size=n), 1)
    b = np.round(y * 0.5 + rng.normal(size=n), 1)
    d = metrics.paired_bootstrap_auc(y, a, b, n_resamples=300, level=0.9, seed=seed)
    boot = _loop_resamples(y, [a, b], 300, seed)
    diffs = boot[0] - boot[1]
    diffs = diffs[np.isfinite(diffs)]
    lo, hi = _interval(diffs, 0.9)
    p = _p_value(diffs)
    assert d.diff == pytest.approx(_brute_auc(y, a) - _brute_auc(y, b), abs=1e-12)
    assert (d.low, d.high) == pytest.approx((lo, hi), abs=1e-12)
    assert 2.0 / (diffs.size + 1) < p < 1.0
    assert d.p_value == pytest.approx(p, abs=1e-12)
    assert d.significant == (lo > 0 or hi < 0)
    assert d.as_dict()["significant"] == d.significant


def _copy_aware_auc(y: np.ndarray, s: np.ndarray, user: np.ndarray, copy: np.ndarray) -> float:
    """Pairwise AUC of pooled user copies, counting a (positive, negative) pair when its
    two samples come from two different users or from the same copy of one user: a user
    drawn twice brings its own pairs twice, not four times. NaN without such a pair."""
    pos, neg = y == 1, y == 0
    keep = (user[pos][:, None] != user[neg][None, :]) | (copy[pos][:, None] == copy[neg][None, :])
    diff = s[pos][:, None] - s[neg][None, :]
    if not keep.any():
        return np.nan
    return float((((diff > 0) + 0.5 * (diff == 0)) * keep).sum() / keep.sum())


def _loop_cluster_resamples(y: np.ndarray, score_sets: list[np.ndarray], users: np.ndarray,
                            n_resamples: int, seed: int) -> np.ndarray:
    """The user-clustered bootstrap by hand: draw as many users as there are, with
    replacement, pool all their samples (a user drawn twice brings its samples twice) and
    count the pairs of _copy_aware_auc."""
    members = [np.flatnonzero(users == u) for u in np.unique(users)]
    rng = np.random.default_rng(seed)
    chunk = metrics._BOOTSTRAP_CHUNK
    out = []
    for start in range(0, n_resamples, chunk):
        draws = rng.integers(0, len(members), size=(min(chunk, n_resamples - start),
                                                     len(members)))
        for row in draws:
            take = np.concatenate([members[u] for u in row])
            copy = np.repeat(np.arange(row.size), [members[u].size for u in row])
            yy = y[take]
            out.append([_copy_aware_auc(yy, s[take], users[take], copy)
                        if 0 < yy.sum() < yy.size else np.nan for s in score_sets])
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
    assert (ci.low, ci.high) == pytest.approx(_interval(boot[0], 0.95), abs=1e-12)
    assert ci.auc == pytest.approx(_brute_auc(y, a), abs=1e-12)
    d = metrics.paired_bootstrap_auc(y, a, b, n_resamples=120, seed=seed, groups=users)
    diffs = boot[0] - boot[1]
    diffs = diffs[np.isfinite(diffs)]
    assert (d.low, d.high) == pytest.approx(_interval(diffs, 0.95), abs=1e-12)
    assert d.p_value == pytest.approx(_p_value(diffs), abs=1e-12)


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


def test_bootstrap_with_too_few_usable_resamples_says_so() -> None:
    """Half the resamples of two samples hold one class: fewer usable resamples than a 95%
    interval needs is a clear error, not numpy's IndexError from an empty array."""
    with pytest.raises(ValueError, match=r"only \d+ resamples held both classes.*single class"
                                         r".*95% interval needs 39"):
        metrics.bootstrap_auc([0, 1], [0.1, 0.2], n_resamples=40, seed=0)
    with pytest.raises(ValueError, match="single class"):
        metrics.paired_bootstrap_auc([0, 1], [0.1, 0.2], [0.2, 0.1], n_resamples=40, seed=0)


def _within_user_signal(seed: int = 0):
    """60 users of 14 samples; two models that order the users alike (one offset per user,
    far apart) and differ only inside each user: a has a within-user signal, b none."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(60), 14)
    rate = rng.uniform(0.2, 0.8, 60)
    y = (rng.random(users.size) < rate[users]).astype(int)
    offset = 100.0 * np.argsort(np.argsort(rate))[users]
    a = offset + y * 1.0 + rng.normal(0, 1, users.size)
    b = offset + rng.normal(0, 1, users.size)
    return users, y, a, b


def test_cluster_bootstrap_is_centred_on_the_point_estimate() -> None:
    """A user drawn c times counted its own pairs c^2 times (every copy with every copy):
    within-user pairs weighed about twice their share, so the paired interval sat at about
    twice the observed difference (mean +0.0080 for +0.0040) and left it out. Counted once
    per copy, the resampled differences and AUCs are centred on the point estimates."""
    users, y, a, b = _within_user_signal()
    d = metrics.paired_bootstrap_auc(y, a, b, groups=users)
    boot = metrics._resampled_aucs(y, [a, b], 1000, 0, metrics._cluster_ids(users, y.size))
    assert abs(np.mean(boot[0] - boot[1]) - d.diff) < 0.1 * d.diff
    assert d.low <= d.diff <= d.high
    # The single-model interval reads the same resamples, counted by the same rule.
    ci = metrics.bootstrap_auc(y, a, groups=users)
    assert abs(np.mean(boot[0]) - ci.auc) < 0.001
    assert (ci.low, ci.high) == pytest.approx(_interval(boot[0], 0.95), abs=1e-12)


def test_p_value_has_the_add_one_floor() -> None:
    """No resample crossing 0 gave p = 0 ("0.000" in results.md), certainty that 1,000
    resamples cannot show: the add-one p is 2 / (R + 1) then."""
    rng = np.random.default_rng(0)
    n = 400
    users, y = rng.integers(0, 60, n), rng.integers(0, 2, n)
    a, b = rng.random(n) + 0.8 * y, rng.random(n) + 0.2 * y
    d = metrics.paired_bootstrap_auc(y, a, b, groups=users)
    assert d.n_resamples == 1000 and d.low > 0
    assert d.p_value == pytest.approx(2 / 1001, abs=1e-15)


@pytest.mark.parametrize(("n_resamples", "level"), [(1000, 0.95), (999, 0.95), (39, 0.95),
                                                    (200, 0.9)])
def test_beyond_noise_is_exactly_p_at_most_one_minus_level(n_resamples: int, level: float,
                                                           monkeypatch) -> None:
    """`significant` (the interval excludes 0) and p <= 1 - level agree for every count of
    resampled differences at or below 0, the boundary included. np.quantile's interpolation
    between the last difference <= 0 and a large first one above had called p = 0.052
    (1,000 resamples, 25 at or below 0) beyond noise."""
    m = int(np.floor((n_resamples + 1) * (1.0 - level) / 2.0 + 1e-9))
    seen = set()
    for below in range(0, m + 3):
        for sign in (1.0, -1.0):  # differences mostly above 0, then mostly below
            diffs = np.r_[-np.linspace(0.0, 0.01, below), np.full(n_resamples - below, 0.5)]
            boot = np.stack([sign * diffs, np.zeros(n_resamples)])
            monkeypatch.setattr(metrics, "_resampled_aucs", lambda *args, boot=boot: boot)
            d = metrics.paired_bootstrap_auc([0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 2, 3],
                                             n_resamples=n_resamples, level=level)
            assert d.p_value == pytest.approx(2 * (below + 1) / (n_resamples + 1))
            assert d.significant == (below < m) == (d.p_value <= 1.0 - level + 1e-12), below
            seen.add(d.significant)
    assert seen == {True, False}


def test_too_few_resamples_for_the_interval_are_refused() -> None:
    """Below m = 1 (R < 2 / (1 - level) - 1) the interval has no order statistic to take;
    one resample had given a zero-width interval and a "significant" difference."""
    y, s = _planted(200, 0)
    with pytest.raises(ValueError, match="n_resamples must be at least 39 for a 95% interval"):
        metrics.paired_bootstrap_auc(y, s, -s, n_resamples=38)
    with pytest.raises(ValueError, match="n_resamples must be at least 19 for a 90% interval"):
        metrics.bootstrap_auc(y, s, n_resamples=1, level=0.9)
    ci = metrics.bootstrap_auc(y, s, n_resamples=39)
    assert (ci.low, ci.high) == pytest.approx(
        _interval(metrics._resampled_aucs(y, [s], 39, 0)[0], 0.95), abs=1e-12)


def test_argument_types_are_named() -> None:
    """threshold NaN or 7 returned 0.5 silently; a fractional or negative resample count or
    seed failed in numpy's words."""
    for threshold in (float("nan"), 7.0, -0.1):
        with pytest.raises(ValueError, match="threshold must be a probability"):
            metrics.accuracy([1, 0], [0.9, 0.1], threshold=threshold)
    labels, scores = [0, 1] * 20, np.linspace(0, 1, 40)
    for bad in (40.5, 1.5, True):
        with pytest.raises(ValueError, match="n_resamples must be an int"):
            metrics.bootstrap_auc(labels, scores, n_resamples=bad)
    with pytest.raises(ValueError, match="seed must be None or an int >= 0"):
        metrics.bootstrap_auc(labels, scores, n_resamples=99, seed=-1)
    with pytest.raises(ValueError, match="n_resamples must be an int"):
        metrics.paired_bootstrap_auc(labels, scores, scores[::-1], n_resamples=99.0)
