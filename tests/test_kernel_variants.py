"""The fast block kernel (expanded quadratic form, float32 sub-blocks where safe) against the
per-component float64 reference kernel: same statistics, same exclusions, same clamping,
whatever the sub-block size, dtype, layout or thread. Correctness only, no timing."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from daskem.model import gmm
from daskem.model.gmm import GMMParams, block_stats, compute_precision_cholesky

COV_TYPES = ("full", "tied", "diag", "spherical")


def _params(ct, K=4, D=5, seed=0, spread=3.0, offset=0.0, weights=None):
    rng = np.random.default_rng(seed)
    means = offset + rng.normal(size=(K, D)) * spread
    A = rng.normal(size=(K, D, D)) * 0.4
    full = np.einsum("kij,klj->kil", A, A) + np.eye(D)
    cov = {
        "full": full,
        "tied": full[0],
        "diag": np.stack([np.diag(c) for c in full]),
        "spherical": np.array([np.trace(c) / D for c in full]),
    }[ct]
    pc, ok = compute_precision_cholesky(cov, ct)
    assert ok.all()
    w = np.full(K, 1.0 / K) if weights is None else np.asarray(weights, dtype=np.float64)
    return GMMParams(w, means, pc, ct, cov)


def _data(p, n=3000, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    K, D = p.means.shape
    z = rng.integers(0, K, n)
    return (p.means[z] + rng.normal(size=(n, D))).astype(dtype)


def _reference(X, p, w=None, y=None):
    return gmm._block_stats_reference(np.asarray(X, dtype=np.float64), p, w, y)


def _assert_stats_close(a, b, rtol, atol=1e-9, worst=True):
    np.testing.assert_allclose(a.n, b.n, rtol=rtol, atol=atol)
    live = b.n > 1e-3 * b.n.max()
    np.testing.assert_allclose(a.mean[live], b.mean[live], rtol=rtol, atol=atol)
    # scatter entries to within rtol of their component's largest entry
    scale = np.abs(b.m2[live]).reshape(live.sum(), -1).max(axis=1)
    scale = scale.reshape((-1,) + (1,) * (b.m2.ndim - 1))
    err = np.abs(a.m2[live] - b.m2[live])
    assert np.all(err <= rtol * scale + atol), (err / scale).max()
    assert a.loglik == pytest.approx(b.loglik, rel=rtol)
    assert a.weight == pytest.approx(b.weight, rel=1e-12)
    assert a.count == b.count
    assert a.n_excluded == b.n_excluded
    if worst:
        np.testing.assert_allclose(a.worst_score, b.worst_score, rtol=rtol, atol=atol)
        np.testing.assert_array_equal(a.worst_rows, b.worst_rows)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_float64_fast_kernel_equals_reference(ct):
    p = _params(ct)
    X = _data(p)
    w = np.random.default_rng(2).uniform(0.1, 2.0, X.shape[0])
    plan = gmm._fast_plan(p, X.dtype, w)
    assert plan is not None and plan.dtype == np.float64
    for weights in (None, w):
        _assert_stats_close(block_stats(X, p, weights), _reference(X, p, weights), rtol=1e-10)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_float32_fast_kernel_is_close_to_float64_reference(ct):
    """float32 sub-blocks (E-step) with float64 statistics: close to exact float64 EM."""
    p = _params(ct, offset=1e3)
    X = _data(p, n=20_000, dtype=np.float32)
    assert gmm._fast_plan(p, X.dtype, None).dtype == np.float32
    fast = block_stats(X, p)
    ref = _reference(X, p)
    _assert_stats_close(fast, ref, rtol=1e-5, atol=1e-6, worst=False)
    # the worst-explained rows are the same rows, with scores to float32 accuracy
    np.testing.assert_allclose(fast.worst_score, ref.worst_score, rtol=1e-5)


def test_float32_large_offset_moments_are_float64_accurate():
    """Mean 1e4, std 1 in float32: moments as accurate as a float64 computation."""
    rng = np.random.default_rng(3)
    X = (1e4 + rng.normal(size=(50_000, 2))).astype(np.float32)
    X64 = X.astype(np.float64)
    for ct in ("full", "diag"):
        cov = np.eye(2) if ct == "full" else np.ones((1, 2))
        pc, _ = compute_precision_cholesky(cov[None] if ct == "full" else cov, ct)
        p = GMMParams(np.ones(1), np.full((1, 2), 1e4 + 0.3), pc, ct)
        s = block_stats(X, p, block_rows=4096)
        np.testing.assert_allclose(s.mean[0], X64.mean(0), rtol=1e-13)
        var = np.diagonal(s.m2[0]) if ct == "full" else s.m2[0]
        np.testing.assert_allclose(var / s.n[0], X64.var(0), rtol=1e-9)


@pytest.mark.parametrize("block_rows", [1, 7, 256, 4096])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sub_block_size_does_not_matter(block_rows, dtype):
    p = _params("full")
    X = _data(p, n=1000, dtype=dtype)
    whole = block_stats(X, p, block_rows=100_000)
    part = block_stats(X, p, block_rows=block_rows)
    # float32 sums differ in rounding with the GEMM shapes: ~1e-6, not 1e-11
    _assert_stats_close(part, whole, rtol=1e-5 if dtype == np.float32 else 1e-11)


def test_outliers_and_huge_values_go_to_the_reference_kernel():
    p = _params("full")
    X = _data(p, n=2000, dtype=np.float32)
    X[5] = 1e5  # far outlier: beyond the radius where float32 is safe
    X[17] = 3e30  # finite in float32, but its square is not
    X[900, 2] = -1e19
    plan = gmm._fast_plan(p, X.dtype, None)
    assert plan.r2min < 1e10
    fast = block_stats(X, p)
    ref = _reference(X, p)
    assert fast.n_excluded == ref.n_excluded == 0
    _assert_stats_close(fast, ref, rtol=1e-5, atol=1e-6, worst=False)
    # the outliers are the worst-explained rows, found and scored in float64
    np.testing.assert_array_equal(fast.worst_rows[:3], ref.worst_rows[:3])
    np.testing.assert_allclose(fast.worst_score[:3], ref.worst_score[:3], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_rows_and_weights_are_excluded(dtype):
    p = _params("diag")
    X = _data(p, n=600, dtype=dtype)
    X[3, 1] = np.nan
    X[10] = np.inf
    X[599, 0] = -np.inf
    w = np.ones(600)
    w[20] = np.nan
    w[21] = 0.0
    for weights in (None, w):
        fast = block_stats(X, p, weights)
        ref = _reference(X, p, weights)
        assert fast.n_excluded == ref.n_excluded == (3 if weights is None else 4)
        rtol = 1e-5 if dtype == np.float32 else 1e-10
        _assert_stats_close(fast, ref, rtol=rtol, atol=1e-6, worst=False)
        assert np.isfinite(fast.m2).all() and np.isfinite(fast.loglik)


def test_negative_weights_raise():
    p = _params("full")
    X = _data(p, n=50)
    w = np.ones(50)
    w[7] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        block_stats(X, p, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_labelled_rows_are_clamped_in_the_statistics(dtype):
    base = _params("full", K=3)
    p = GMMParams(
        base.weights,
        base.means,
        base.precisions_cholesky,
        "full",
        base.covariances,
        component_class=np.array([0, 0, 1]),
    )
    X = _data(p, n=400, dtype=dtype)
    y = np.full(400, -1)
    y[:50] = 1  # class 1 is component 2 alone
    y[50:80] = 0  # class 0 is components 0 and 1
    fast = block_stats(X[:50], p, labels=y[:50])
    assert fast.n[0] == 0.0 and fast.n[1] == 0.0  # exactly, not e^-80
    assert fast.n[2] == pytest.approx(50.0)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    _assert_stats_close(block_stats(X, p, labels=y), _reference(X, p, y=y), rtol, 1e-6, False)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the reference's -inf - -inf
def test_labelled_row_without_an_allowed_live_component():
    """A labelled row whose class has zero weight is handled like the reference does."""
    p = _params("diag", K=3, weights=[0.5, 0.5, 0.0])
    X = _data(p, n=100)
    y = np.full(100, -1)
    y[4] = 2
    fast = block_stats(X, p, labels=y)
    ref = _reference(X, p, y=y)
    assert fast.loglik == ref.loglik == -np.inf
    np.testing.assert_allclose(fast.n, ref.n, rtol=1e-10)


def test_zero_weight_component_gets_no_mass():
    p = _params("full", K=3, weights=[0.6, 0.4, 0.0])
    X = _data(p, n=500)
    fast = block_stats(X, p)
    assert fast.n[2] == 0.0
    _assert_stats_close(fast, _reference(X, p), rtol=1e-10)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_tiny_weights_use_float64_sub_blocks(ct):
    p = _params(ct)
    X = _data(p, n=300, dtype=np.float32)
    w = np.full(300, 1e-6)
    assert gmm._fast_plan(p, X.dtype, w).dtype == np.float64
    s = block_stats(X, p, w)
    _assert_stats_close(s, _reference(X, p, w), rtol=1e-10, atol=1e-15)


def test_far_apart_components_use_the_exact_residual_form():
    """Components 1e9 spreads apart: no dtype bounds the expanded form; still exact."""
    p = _params("full", K=2, D=2, spread=1e9)
    X = _data(p, n=200)
    plan = gmm._fast_plan(p, X.dtype, None)
    assert plan.dtype == np.float64 and plan.n_quad == 0 and plan.n_res == 2
    _assert_stats_close(block_stats(X, p), _reference(X, p), rtol=1e-12)


@pytest.mark.parametrize("ct", COV_TYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thin_component_mixes_expanded_and_residual_forms(ct, dtype):
    """One nearly singular component far from the centre: it alone takes the exact float64
    residual form, the others keep the expanded form (in float32 for float32 data)."""
    K, D = 4, 5
    base = _params("full", K=K, D=D, seed=7, spread=4.0)
    cov = base.covariances.copy()
    u = np.ones(D) / np.sqrt(D)
    cov[1] = 1e-5 * np.eye(D) + 9.0 * np.outer(u, u)  # a thin needle
    means = base.means.copy()
    means[1] += 30.0
    if ct == "tied":
        cov = cov[1]
    elif ct == "diag":
        cov = np.stack([np.diag(c) for c in cov])
        cov[1] = 1e-6
    elif ct == "spherical":
        cov = np.array([1.0, 1e-6, 2.0, 0.5])
    pc, ok = compute_precision_cholesky(cov, ct)
    p = GMMParams(np.full(K, 0.25), means, pc, ct, cov)
    rng = np.random.default_rng(8)
    X = (means[rng.integers(0, K, 4000)] + rng.normal(size=(4000, D)) * 0.7).astype(dtype)
    along = rng.normal(size=(50, 1)) * 3 * u if ct in ("full", "tied") else 0.0
    X[:50] = means[1] + along + rng.normal(size=(50, D)) * 1e-3
    plan = gmm._fast_plan(p, X.dtype, None)
    if ct == "tied":  # every component is the needle
        assert plan.dtype == np.float64 and plan.n_res == K
    else:
        assert plan.n_res >= 1 and plan.order[-1] == 1
    if ct == "full":  # the needle alone: the others stay in float32 sub-blocks
        assert plan.dtype == dtype and plan.n_res == 1
    fast = block_stats(X, p)
    ref = _reference(X, p)
    rtol = 1e-8 if dtype == np.float64 else 1e-5
    _assert_stats_close(fast, ref, rtol=rtol, atol=1e-9, worst=False)
    assert fast.n[1] > 40
    # the needle's own statistics are exact, whatever the dtype of the others
    np.testing.assert_allclose(fast.m2[1], ref.m2[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("D", [1, 2])
def test_one_and_two_features(D):
    p = _params("full", K=2, D=D)
    X = _data(p, n=300)
    _assert_stats_close(block_stats(X, p), _reference(X, p), rtol=1e-10)


def test_layout_and_small_blocks():
    p = _params("full")
    X = _data(p, n=257, dtype=np.float32)
    ref = block_stats(X, p)
    _assert_stats_close(block_stats(np.asfortranarray(X), p), ref, rtol=1e-12, worst=False)
    _assert_stats_close(block_stats(np.ascontiguousarray(X.T).T, p), ref, rtol=1e-12)
    one = block_stats(X[:1], p)
    assert one.count == 1 and one.n.sum() == pytest.approx(1.0)
    empty = block_stats(X[:0], p)
    assert empty.count == 0 and empty.n.sum() == 0


def test_threads_share_nothing():
    """Workspaces are per thread: concurrent calls give the serial results bit for bit."""
    p = _params("full", K=6, D=8)
    X = _data(p, n=40_000, dtype=np.float32)
    cuts = list(range(0, 40_000, 5000))
    serial = [block_stats(X[a : a + 5000], p, block_rows=1024) for a in cuts]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            par = list(ex.map(lambda a: block_stats(X[a : a + 5000], p, block_rows=1024), cuts))
            for s, q in zip(serial, par, strict=True):
                np.testing.assert_array_equal(s.n, q.n)
                np.testing.assert_array_equal(s.m2, q.m2)
                assert s.loglik == q.loglik


@pytest.mark.parametrize("n", [0, 5, 64, 1000, 10_007])
@pytest.mark.parametrize("take", [1, 16, 70])
def test_lowest_finds_the_smallest_scores(n, take):
    rng = np.random.default_rng(n + take)
    score = np.round(rng.normal(size=n), 1)  # many ties
    score[rng.integers(0, max(n, 1), size=min(n, 5))] = np.inf
    take = min(take, n)
    idx = gmm._lowest(score, take)
    assert len(idx) == take == len(set(idx.tolist()))
    np.testing.assert_array_equal(np.sort(score[idx]), np.sort(score)[:take])


@pytest.mark.parametrize("ct", COV_TYPES)
def test_single_precision_is_close_to_float64_reference(ct):
    """precision="single": float32 GEMMs for the E-step and the per-sub-block statistics,
    float64 sums of sub-blocks; statistics within ~1e-5 of the float64 reference."""
    p = _params(ct, offset=1e3)
    X = _data(p, n=20_000, dtype=np.float32)
    plan = gmm._fast_plan(p, X.dtype, None, single=True)
    assert plan.dtype == np.float32 and plan.stats_dtype == np.float32
    fast = block_stats(X, p, precision="single")
    auto = block_stats(X, p)
    ref = _reference(X, p)
    _assert_stats_close(fast, ref, rtol=1e-4, atol=1e-5, worst=False)
    # the sub-block size changes the float32 rounding only
    _assert_stats_close(block_stats(X, p, precision="single", block_rows=1000), fast, rtol=1e-4)
    # and it is not the same arithmetic as "auto" (float64 statistics GEMM)
    assert not np.array_equal(fast.m2, auto.m2)


def test_single_precision_keeps_a_thin_component_exact_and_float64_input_as_auto():
    K, D = 4, 5
    base = _params("full", K=K, D=D, seed=7, spread=4.0)
    cov = base.covariances.copy()
    u = np.ones(D) / np.sqrt(D)
    cov[1] = 1e-7 * np.eye(D) + 9.0 * np.outer(u, u)
    pc, _ = compute_precision_cholesky(cov, "full")
    p = GMMParams(np.full(K, 0.25), base.means, pc, "full", cov)
    rng = np.random.default_rng(8)
    X = (base.means[rng.integers(0, K, 4000)] + rng.normal(size=(4000, D)) * 0.7).astype(np.float32)
    X[:50] = base.means[1] + rng.normal(size=(50, 1)) * 3 * u + rng.normal(size=(50, D)) * 1e-4
    plan = gmm._fast_plan(p, X.dtype, None, single=True)
    assert plan.n_res == 1 and plan.order[-1] == 1
    fast = block_stats(X, p, precision="single")
    ref = _reference(X, p)
    np.testing.assert_allclose(fast.m2[1], ref.m2[1], rtol=1e-6, atol=1e-12)
    X64 = X.astype(np.float64)
    single64 = block_stats(X64, p, precision="single")
    auto64 = block_stats(X64, p)
    np.testing.assert_array_equal(single64.m2, auto64.m2)
    with pytest.raises(ValueError, match="precision"):
        block_stats(X, p, precision="half")


def test_single_precision_residual_form_in_float32_when_its_bound_allows():
    """A thin component far from the centre: float64 residual form under "auto", float32
    residual form under "single" (its rounding bound allows it); both close to exact."""
    K, D = 4, 5
    base = _params("full", K=K, D=D, seed=7, spread=4.0)
    cov = base.covariances.copy()
    u = np.ones(D) / np.sqrt(D)
    cov[1] = 1e-3 * np.eye(D) + 9.0 * np.outer(u, u)
    means = base.means.copy()
    means[1] += 30.0
    pc, _ = compute_precision_cholesky(cov, "full")
    p = GMMParams(np.full(K, 0.25), means, pc, "full", cov)
    rng = np.random.default_rng(8)
    z = rng.integers(0, K, 20_000)
    X = np.stack([rng.multivariate_normal(means[k], cov[k]) for k in z]).astype(np.float32)
    auto = gmm._fast_plan(p, X.dtype, None)
    single = gmm._fast_plan(p, X.dtype, None, single=True)
    assert auto.res_dtype == np.float64 and auto.order[-1] == 1
    assert single.res_dtype == np.float32 and single.order[-1] == 1
    ref = _reference(X, p)
    _assert_stats_close(block_stats(X, p), ref, rtol=1e-5, atol=1e-6, worst=False)
    fast = block_stats(X, p, precision="single")
    _assert_stats_close(fast, ref, rtol=1e-4, atol=1e-5, worst=False)
    # the thin direction's variance (1e-3) to 1e-3 of itself
    thin = np.linalg.eigvalsh(fast.m2[1] / fast.n[1])[0]
    assert thin == pytest.approx(np.linalg.eigvalsh(ref.m2[1] / ref.n[1])[0], rel=1e-3)


@pytest.mark.parametrize("ct", ["full", "tied", "diag"])
def test_attributes_in_different_units_use_the_scaled_expanded_form(ct):
    """Spreads of 0.04 and 50 with offsets of hundreds (like the demo stack): in
    per-feature power-of-two units every component keeps the expanded form, in float32,
    and the statistics stay as exact as the float64 reference."""
    base = _params(ct, K=4, D=4, seed=5, spread=2.0)
    units = np.array([0.04, 2.0, 50.0, 3.0])
    offset = np.array([0.2, -11.0, 340.0, 290.0])
    X = (_data(base, n=20_000, seed=7) * units + offset).astype(np.float32)
    cov = base.covariances * (units**2 if ct == "diag" else np.outer(units, units))
    pc, ok = compute_precision_cholesky(cov, ct)
    assert ok.all()
    p = GMMParams(base.weights, base.means * units + offset, pc, ct, cov)
    plan = gmm._fast_plan(p, X.dtype, None)
    assert plan.scale is not None and plan.n_res == 0 and plan.dtype == np.float32
    np.testing.assert_array_equal(np.log2(plan.scale), np.round(np.log2(plan.scale)))
    _assert_stats_close(block_stats(X, p), _reference(X, p), rtol=1e-5, atol=1e-6, worst=False)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_float64_sub_blocks_of_float32_input_take_exp_in_float32(ct):
    """Components far from the common centre: float32 cannot bound their expanded form, so
    float32 input gets float64 sub-blocks, whose responsibilities alone are exponentiated in
    float32 (relative error ~1e-7): statistics of overlapping pairs still within 1e-7 of the
    float64 reference (~1e-9 measured), and float64 input keeps float64 throughout."""
    p = _params(ct, K=6, D=4, seed=3, spread=25.0)
    means = p.means.copy()
    means[3:] = means[:3] + 0.7  # three far-apart pairs of overlapping components
    p = GMMParams(p.weights, means, p.precisions_cholesky, ct, p.covariances)
    X32 = _data(p, n=20_000, seed=4, dtype=np.float32)
    plan = gmm._fast_plan(p, X32.dtype, None)
    assert plan.dtype == np.float64 and plan.exp32 and plan.n_res < 6
    _assert_stats_close(block_stats(X32, p), _reference(X32, p), rtol=1e-7, worst=False)
    X64 = X32.astype(np.float64)
    assert not gmm._fast_plan(p, X64.dtype, None).exp32
    _assert_stats_close(block_stats(X64, p), _reference(X64, p), rtol=1e-10, worst=False)
