"""The native CPU kernels (``kernels.native``) against plain torch: selection, input preparation,
Adam, and how the library is built, cached and given up on."""
import contextlib
import os
import time
import warnings

import pytest
import torch

import sae
from kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the native kernels cannot be built")


def reference_topk(pre: torch.Tensor, bias: torch.Tensor | None, k: int, relu: bool):
    values = pre + bias if bias is not None else pre.clone()
    top = values.topk(k, dim=-1)
    return (top.values.clamp_min(0) if relu else top.values), top.indices, values


def assert_same_selection(got, pre, bias, k, relu):
    """Same ranked values bit for bit; each index points at its value; and the latent sets agree
    wherever the ranking is unambiguous (above the k-th value; ties there may pick any of them)."""
    vals, idx = got
    want_vals, want_idx, values = reference_topk(pre, bias, k, relu)
    assert torch.equal(vals, want_vals)
    picked = values.gather(1, idx)
    assert torch.equal(picked.clamp_min(0) if relu else picked, vals)
    assert all(len(set(row)) == k for row in idx.tolist()), "a latent picked twice"
    kth = values.gather(1, want_idx[:, -1:])
    for row in range(pre.shape[0]):
        above = values[row] > kth[row]
        assert set(idx[row][values[row, idx[row]] > kth[row]].tolist()) == set(above.nonzero().flatten().tolist())


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (16, 16), (37, 1), (100, 100), (300, 5), (1000, 32), (2053, 64),
                                 (4096, 300), (16_000, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_topk_rows_matches_torch_topk(n, k, with_bias, relu):
    g = torch.Generator().manual_seed(n * 1000 + k)
    rows = 5 if n > 4000 else 23
    pre = torch.randn(rows, n, generator=g) * 2 - 0.5
    bias = torch.randn(n, generator=g) if with_bias else None
    got = native.topk_rows(pre, bias, k, relu)
    assert got is not None
    assert_same_selection(got, pre, bias, k, relu)


@pytest.mark.parametrize("relu", [False, True])
def test_topk_rows_on_a_row_slice_of_a_wider_buffer(relu):
    """Rows strided (a column slice of a wider buffer), written into slices of wider outputs."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(40, 700, generator=g)
    pre = wide[5:35, 100:613]  # stride(0) = 700, unit column stride
    bias = torch.randn(513, generator=g)
    vals, idx = torch.full((40, 9), -7.0), torch.full((40, 9), -1, dtype=torch.long)
    got = native.topk_rows(pre, bias, 9, relu, out=(vals[5:35], idx[5:35]))
    assert got is not None and got[0].data_ptr() == vals[5:35].data_ptr()
    assert_same_selection((vals[5:35], idx[5:35]), pre.contiguous(), bias, 9, relu)
    assert (vals[:5] == -7).all() and (vals[35:] == -7).all() and (idx[:5] == -1).all(), "wrote outside its rows"


def test_topk_rows_with_ties_and_equal_values():
    g = torch.Generator().manual_seed(2)
    pre = torch.randint(-3, 4, (50, 200), generator=g).float()  # every value repeated many times
    for k in (1, 7, 64, 200):
        assert_same_selection(native.topk_rows(pre, None, k, relu=False), pre, None, k, False)
        assert_same_selection(native.topk_rows(pre, None, k, relu=True), pre, None, k, True)


def test_topk_rows_relu_clamps_negatives_to_zero():
    pre = -torch.rand(4, 50) - 0.1  # all negative
    pre[0, 3] = 2.0
    vals, idx = native.topk_rows(pre, None, 5, relu=True)
    assert (vals[1:] == 0).all() and vals[0, 0] == 2.0 and idx[0, 0] == 3 and (vals[0, 1:] == 0).all()
    vals, _ = native.topk_rows(pre, None, 5, relu=False)
    assert (vals[1:] < 0).all()


@pytest.mark.parametrize("where", ["bias", "pre"])
def test_topk_rows_with_a_nan_returns_none(where):
    pre, bias = torch.randn(6, 300), torch.randn(300)
    if where == "pre":
        pre[4, 17] = float("nan")
    else:
        bias[250] = float("nan")
    assert native.topk_rows(pre, bias, 8, relu=True) is None


def test_topk_rows_handles_infinities():
    pre = torch.randn(3, 100)
    pre[0, 5], pre[1, 9], pre[2, :] = float("inf"), float("-inf"), float("-inf")
    assert_same_selection(native.topk_rows(pre, None, 4, relu=False), pre, None, 4, False)


@pytest.mark.parametrize("ranked", [True, False])
def test_topk_rows_over_many_rows_of_changing_scale(ranked):
    """Many rows (the single-pass selection starts from the k-th values of recent rows): rows far
    below their predecessors (fewer than k elements reach the starting threshold), far above
    them (the candidate buffer refills), constant rows (ties overflow it), and infinities."""
    g = torch.Generator().manual_seed(3)
    n, k = 1024, 32
    scale = torch.ones(600)
    scale[100:110], scale[200:210], scale[300] = 1e-3, 1e3, 0.0
    pre = torch.randn(600, n, generator=g) * scale[:, None]
    pre[400, 7], pre[401, 100:200], pre[402, :50] = float("inf"), float("-inf"), float("inf")
    bias = torch.randn(n, generator=g)
    for relu in (False, True):
        vals, idx = native.topk_rows(pre, bias, k, relu, ranked=ranked)
        if not ranked:  # same selection in some order: rank it for the comparison
            vals, order = vals.sort(dim=1, descending=True, stable=True)
            idx = idx.gather(1, order)
        assert_same_selection((vals, idx), pre, bias, k, relu)


def test_topk_rows_keeps_early_winners_when_its_buffer_refills():
    """The row's top k come first and hundreds of lesser values follow: the single-pass
    selection's candidate buffer overflows and must keep them (ties at its threshold included)."""
    g = torch.Generator().manual_seed(5)
    pre = torch.rand(64, 2048, generator=g)
    pre[:, :32] = 11 + torch.rand(64, 32, generator=g)
    pre[:, 31] = pre[:, 1500] = 10.5  # a tie at the k-th value: the lower column wins
    for ranked in (True, False):
        vals, idx = native.topk_rows(pre, None, 32, relu=False, ranked=ranked)
        assert (idx.sort(dim=1).values == torch.arange(32)).all()


def test_topk_rows_unranked_picks_the_ranked_set():
    g = torch.Generator().manual_seed(4)
    pre, bias = torch.randn(300, 2048, generator=g), torch.randn(2048, generator=g)
    vals, idx = native.topk_rows(pre, bias, 16, relu=True)
    vals_u, idx_u = native.topk_rows(pre, bias, 16, relu=True, ranked=False)
    assert torch.equal(idx.sort(dim=1).values, idx_u.sort(dim=1).values)
    assert torch.equal(vals_u, (pre + bias).gather(1, idx_u).clamp_min(0))


def test_topk_rows_with_a_nan_after_many_rows_returns_none():
    pre = torch.randn(200, 512)
    pre[150, 300] = float("nan")
    assert native.topk_rows(pre, None, 8, relu=True, ranked=False) is None


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ranked_by_value(got):
    """An unranked selection ranked (value descending, then column ascending) for comparison."""
    vals, idx = got
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


@pytest.mark.parametrize("n,k", [(8, 1), (8, 8), (64, 64), (128, 64), (128, 65), (1024, 64), (1024, 65)])
@pytest.mark.parametrize("threads", [1, 2])
def test_topk_rows_single_pass_edges_on_one_and_two_threads(n, k, threads):
    """n = 8 (one vector a row), k = n, and k = 64 / 65 (the last k of the single pass and the
    first past it), over enough rows that each thread starts from its recent rows' threshold."""
    g = torch.Generator().manual_seed(n + k)
    pre = torch.randn(70, n, generator=g) * torch.logspace(-2, 2, 70)[torch.randperm(70, generator=g), None]
    bias = torch.randn(n, generator=g)
    with torch_threads(threads):
        for b in (None, bias):
            ranked = native.topk_rows(pre, b, k, relu=False)
            assert_same_selection(ranked, pre, b, k, False)
            unranked = native.topk_rows(pre, b, k, relu=True, ranked=False)
            assert_same_selection(ranked_by_value(unranked), pre, b, k, True)
            # the same set, ties at the k-th value included (the lower column wins on every path)
            assert torch.equal(ranked_by_value(native.topk_rows(pre, b, k, relu=False, ranked=False))[1], ranked[1])


def test_topk_rows_is_the_same_on_one_and_two_threads_over_rows_of_jumping_scale():
    """The starting threshold comes from each thread's own recent rows, so the two thread counts
    take different paths through rows whose scale jumps by 10^6; the result must not change."""
    g = torch.Generator().manual_seed(8)
    scale = 10.0 ** torch.tensor([(-3, 0, 3)[(r // 7) % 3] for r in range(160)])
    pre = torch.randn(160, 512, generator=g) * scale[:, None] + 0.5 * scale[:, None]
    bias = torch.randn(512, generator=g) * 0.01
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            results.append(native.topk_rows(pre, bias, 24, relu=True))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert_same_selection(results[0], pre, bias, 24, True)


@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_rows_single_pass_on_strided_rows_reads_only_its_columns(with_bias):
    """Rows of n % 8 == 0 (the single pass) sliced from a wider buffer whose other columns hold
    values larger than any in the slice: reading past a row's end would pick them."""
    g = torch.Generator().manual_seed(9)
    wide = torch.full((60, 700), 1e6)
    wide[:, 96:608] = torch.randn(60, 512, generator=g)
    pre = wide[:, 96:608]
    bias = torch.randn(512, generator=g) if with_bias else None
    for k in (1, 16, 64):
        for ranked in (True, False):
            got = native.topk_rows(pre, bias, k, relu=False, ranked=ranked)
            assert_same_selection(got if ranked else ranked_by_value(got), pre.contiguous(), bias, k, False)


def test_topk_rows_constant_rows_rows_below_the_threshold_and_ties_overflowing_the_buffer():
    """After ordinary rows (a starting threshold near their k-th value): constant rows above and
    below it and at zero (ties overflow the candidate buffer), a row entirely below it, one with
    exactly k elements above it, and two whose k-th value is shared by 500 and by 100 elements
    (the larger values after them). Ties go to the lowest columns."""
    g = torch.Generator().manual_seed(10)
    n, k = 1024, 32
    pre = torch.randn(48, n, generator=g)
    pre[20], pre[21], pre[22] = 7.0, -7.0, 0.0
    pre[23] = torch.randn(n, generator=g) * 1e-3 - 10  # all below the threshold
    pre[24] = -5.0
    pre[24, torch.randperm(n, generator=g)[:k]] = 5.0 + torch.rand(k, generator=g)  # exactly k above it
    pre[25] = torch.rand(n, generator=g)
    pre[25, 1000:1020] = 9 + torch.rand(20, generator=g)
    pre[25, 300:800] = 3.0  # 500 ties at the k-th value, before the larger values
    pre[26] = pre[25]
    pre[26, 400:800] = 0.5  # 100 ties: the candidate buffer holds them
    for ranked in (True, False):
        for relu in (False, True):
            got = native.topk_rows(pre, None, k, relu, ranked=ranked)
            vals, idx = got if ranked else ranked_by_value(got)
            assert_same_selection((vals, idx), pre, None, k, relu)
            for row in (20, 21, 22):
                assert torch.equal(idx[row], torch.arange(k)), "a tie at the k-th value: the lowest columns"
            for row in (25, 26):
                assert set(idx[row].tolist()) == set(range(1000, 1020)) | set(range(300, 312))
            assert set(idx[24].tolist()) == set((pre[24] > 0).nonzero().flatten().tolist())


def test_topk_rows_breaks_ties_between_signed_zeros_by_column_whatever_the_rows_before():
    """-0.0 == 0.0: a k-th value of zero shared by both signs goes to the lowest columns. The row
    alone takes the fallback selection (260 ties at -0.5 overflow the single pass's buffer from
    a threshold of -inf); after rows whose k-th value is 0 it takes the single pass. Both paths,
    and so 1 and 2 threads, must pick the same zeros."""
    n, k = 1024, 30
    row = torch.full((n,), -1.0)
    row[300:320] = 2.0 + torch.arange(20.0)
    row[600:620] = torch.tensor([-0.0, 0.0] * 10)
    target = row.clone()
    target[:260] = -0.5
    want = set(range(300, 320)) | set(range(600, 610))
    rows = torch.stack([row] * 20 + [target])
    for ranked in (True, False):
        alone = native.topk_rows(target[None].clone(), None, k, relu=False, ranked=ranked)
        assert set(alone[1][0].tolist()) == want
        for threads in (1, 2):
            with torch_threads(threads):
                after = native.topk_rows(rows, None, k, relu=False, ranked=ranked)
            assert set(after[1][-1].tolist()) == want
    # a bias of -0.0 keeps each zero's sign (-0 + -0 = -0, 0 + -0 = 0)
    _, idx = native.topk_cols(target[None].clone(), torch.full((n,), -0.0), torch.arange(590, 620), 5, relu=False)
    assert set(idx[0].tolist()) == set(range(600, 605))


def test_topk_rows_refuses_k_out_of_range_and_misshapen_outputs():
    pre = torch.randn(4, 16)
    for k in (0, 17):
        with pytest.raises(ValueError, match=f"k={k}"):
            native.topk_rows(pre, None, k, relu=False)
    with pytest.raises(ValueError, match="out must be"):
        native.topk_rows(pre, None, 3, relu=False, out=(torch.empty(4, 2), torch.empty(4, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="bias"):
        native.topk_rows(pre, torch.randn(8), 3, relu=False)
    assert native.topk_rows(pre, None, 16, relu=False) is not None


@pytest.mark.parametrize("n,n_cols,k", [(50, 50, 3), (300, 17, 17), (1000, 130, 5), (1000, 1, 1), (4096, 1024, 64)])
@pytest.mark.parametrize("relu", [False, True])
def test_topk_cols_matches_a_masked_topk(n, n_cols, k, relu):
    g = torch.Generator().manual_seed(n + n_cols)
    wide = torch.randn(20, n + 11, generator=g)
    pre = wide[:, 3 : n + 3]  # strided rows
    bias = torch.randn(n, generator=g)
    cols = torch.randperm(n, generator=g)[:n_cols].sort().values
    vals, idx = native.topk_cols(pre, bias, cols, k, relu)
    masked = torch.full((20, n), float("-inf"))
    masked[:, cols] = (pre + bias)[:, cols]
    want = masked.topk(k, dim=-1)
    assert torch.equal(vals, want.values.clamp_min(0) if relu else want.values)
    assert torch.isin(idx, cols).all()
    assert all(set(a) == set(b) for a, b in zip(idx.tolist(), want.indices.tolist()))


def test_topk_cols_unranked_picks_the_ranked_set_with_ties_and_infinities():
    g = torch.Generator().manual_seed(6)
    pre = torch.randint(-4, 5, (64, 3000), generator=g).float()  # many ties at the k-th value
    pre[3, 7], pre[4, :100] = float("inf"), float("-inf")
    cols = torch.randperm(3000, generator=g)[:1200]
    for relu in (False, True):
        ranked = native.topk_cols(pre, None, cols, 40, relu)
        vals, idx = native.topk_cols(pre, None, cols, 40, relu, ranked=False)
        assert torch.equal(idx.sort(dim=1).values, ranked[1].sort(dim=1).values)
        picked = pre.gather(1, idx)
        assert torch.equal(vals, picked.clamp_min(0) if relu else picked)
    with pytest.raises(ValueError, match="k=5"):
        native.topk_cols(pre, None, cols[:4], 5, relu=False)
    with pytest.raises(ValueError, match="column indices"):
        native.topk_cols(pre, None, torch.tensor([0, 3000]), 1, relu=False)
    with pytest.raises(ValueError, match="bias must have shape"):
        native.topk_cols(pre, torch.zeros(10), cols, 1, relu=False)


@pytest.mark.parametrize("threads", [1, 2])
def test_topk_cols_takes_every_column_and_the_k_th_among_infinities_and_ties(threads):
    """k = the number of columns (all of them, the quickselect's k = count) and k near it, on rows
    with -inf, +inf, signed zeros and many ties: the values equal a topk over those columns."""
    g = torch.Generator().manual_seed(11)
    pre = torch.randint(-2, 3, (30, 400), generator=g).float()
    pre[:10, ::3] = float("-inf")
    pre[10:20, ::5] = float("inf")
    pre[20:] = torch.where(torch.rand(10, 400, generator=g) < 0.5, -0.0, 0.0)
    cols = torch.randperm(400, generator=g)[:90]
    with torch_threads(threads):
        for k in (90, 89, 45, 1):
            for ranked in (True, False):
                vals, idx = native.topk_cols(pre, None, cols, k, relu=False, ranked=ranked)
                want = pre[:, cols].topk(k, dim=1).values
                assert torch.equal(vals.sort(dim=1, descending=True).values, want)
                assert torch.isin(idx, cols).all() and all(len(set(row)) == k for row in idx.tolist())
                assert torch.equal(pre.gather(1, idx), vals)


def test_topk_cols_with_a_nan_among_the_columns_returns_none_and_ignores_others():
    pre = torch.randn(4, 60)
    pre[2, 10] = float("nan")
    assert native.topk_cols(pre, None, torch.tensor([3, 10, 40]), 2, relu=True) is None
    assert native.topk_cols(pre, None, torch.tensor([3, 11, 40]), 2, relu=True) is not None


def test_prepare_matches_torch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(333, 45, generator=g) * 5 + 3
    b_dec = torch.randn(45, generator=g)
    xc, total = native.prepare(x, 0.37, b_dec)
    torch.testing.assert_close(xc, x * 0.37 - b_dec, rtol=1e-6, atol=1e-6)
    x64 = x.double()
    assert total == pytest.approx(float((x64 - x64.mean(0)).pow(2).sum()), rel=1e-5)
    _, total_nan = native.prepare(torch.where(torch.arange(45) == 7, float("nan"), x), 1.0, b_dec)
    assert total_nan != total_nan


@pytest.mark.parametrize("threads", [1, 2])
def test_prepare_total_variance_of_a_large_mean_and_small_spread(threads):
    """sum(x^2) - sum(x)^2 / N cancels when the mean dwarfs the spread: columns of mean 100-600
    and spread ~1 (beyond real activations, whose |mean| / std stays below ~10) keep 1e-7 of a
    float64 reference; one row has zero variance."""
    g = torch.Generator().manual_seed(12)
    x = 100 + 500 * torch.rand(64, generator=g) + torch.randn(515, 64, generator=g)
    b_dec = torch.randn(64, generator=g)
    with torch_threads(threads):
        xc, total = native.prepare(x, 0.5, b_dec)
        torch.testing.assert_close(xc, x * 0.5 - b_dec, rtol=1e-6, atol=1e-6)
        x64 = x.double()
        assert total == pytest.approx(float((x64 - x64.mean(0)).pow(2).sum()), rel=1e-7)
        assert native.prepare(x[:1], 1.0, b_dec)[1] == pytest.approx(0.0, abs=1e-6)


def test_scratch_reuses_its_buffer():
    a = native.scratch("test-buffer", 10, 20)
    b = native.scratch("test-buffer", 5, 4)
    assert a.shape == (10, 20) and b.shape == (5, 4) and a.data_ptr() == b.data_ptr()
    assert native.scratch("test-buffer", 30, 30).numel() == 900


@pytest.mark.parametrize("shape", [(37,), (13, 40), (1, 8), (64, 3)])
@pytest.mark.parametrize("grad_scale", [1.0, 0.3])
def test_adam_matches_torch_fused_adam(shape, grad_scale):
    g = torch.Generator().manual_seed(sum(shape))
    start = torch.randn(*shape, generator=g)
    ref = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([ref], lr=3e-3, betas=(0.9, 0.99), eps=1e-7, fused=True)
    param, m, v = start.clone(), torch.zeros(shape), torch.zeros(shape)
    for step in range(1, 8):
        grad = torch.randn(*shape, generator=g) * 10 ** (step % 3 - 1)
        ref.grad = grad * grad_scale
        opt.step()
        native.adam(param, grad, m, v, step, 3e-3, (0.9, 0.99), 1e-7, grad_scale=grad_scale)
        torch.testing.assert_close(param, ref.detach(), rtol=1e-5, atol=1e-7)
        # the moments to 1e-5 of their largest entry: m - g cancels in both formulas
        for got, want in ((m, opt.state[ref]["exp_avg"]), (v, opt.state[ref]["exp_avg_sq"])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert not torch.equal(param, start)


def test_adam_with_renorm_rows_is_adam_then_unit_rows():
    g = torch.Generator().manual_seed(5)
    start = torch.randn(21, 33, generator=g)
    start /= start.norm(dim=1, keepdim=True)
    ref = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([ref], lr=1e-2, fused=True)
    param, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for step in range(1, 6):
        grad = torch.randn(21, 33, generator=g)
        ref.grad = grad.clone()
        opt.step()
        with torch.no_grad():
            ref /= ref.norm(dim=1, keepdim=True).clamp_min(1e-8)
        native.adam(param, grad, m, v, step, 1e-2, (0.9, 0.999), 1e-8, renorm_rows=True)
        torch.testing.assert_close(param, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(param.norm(dim=1), torch.ones(21), rtol=1e-6, atol=1e-6)


def test_wrappers_refuse_tensors_they_cannot_take():
    with pytest.raises(ValueError, match="unit column stride"):
        native.topk_rows(torch.randn(10, 8).t(), None, 2, relu=False)
    for wrong in (torch.randn(4, 64, dtype=torch.float64), torch.randn(64)):  # read as float32 rows, it was garbage
        with pytest.raises(ValueError, match="2-D CPU float32"):
            native.topk_rows(wrong, None, 2, relu=False)
        with pytest.raises(ValueError, match="2-D CPU float32"):
            native.topk_cols(wrong, None, torch.tensor([0, 5]), 1, relu=False)
    with pytest.raises(ValueError, match="float32"):
        native.prepare(torch.randn(4, 3), 1.0, torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        native.adam(torch.randn(4, 6)[:, ::2], torch.randn(4, 3), torch.zeros(4, 3), torch.zeros(4, 3), 1, 1e-3,
                    (0.9, 0.999), 1e-8)


# -- building ------------------------------------------------------------------------------------

def test_build_is_cached_by_content(tmp_path):
    compiler = native._compiler()
    first = native.build(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    time.sleep(0.01)
    again = native.build(compiler, tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name], "left temporary files behind"


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The module as if never loaded, caching into a temporary folder; restored afterwards."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def failing_compiler(folder):
    script = folder / "broken-c++"
    script.write_text("#!/bin/sh\necho 'broken-c++: cannot compile' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


def train_a_few_steps(steps: int = 4) -> sae.Trainer:
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(d_in=12, n_latents=48, k=3))
    trainer = sae.Trainer(model, sae.TrainConfig(log_every=100, warmup_steps=1))
    before = model.W_enc.detach().clone()
    for _ in range(steps):
        trainer.train_step(torch.randn(64, 12))
    assert not torch.equal(model.W_enc, before)
    return trainer


def test_a_failing_compiler_warns_once_and_training_takes_the_torch_path(fresh_native, monkeypatch):
    from sae import fused_step

    monkeypatch.setenv("CXX", failing_compiler(fresh_native))
    with pytest.warns(UserWarning, match="(?s)native CPU kernels unavailable.*cannot compile"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not native.available()
        calls = []
        original = fused_step.loss_and_grads
        monkeypatch.setattr(fused_step, "loss_and_grads", lambda *a: calls.append(1) or original(*a))
        trainer = train_a_few_steps()
    assert len(calls) == 3 and trainer.step == 4  # asked at every step after the first, declined each time
    assert not any((fresh_native / "cache" / "native").glob("*.so"))


def test_no_compiler_warns_and_returns_none(fresh_native, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_native / "nowhere" / "c++"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert native.library() is None
    train_a_few_steps()


def test_switched_off_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("SAE_NATIVE_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
    assert not (fresh_native / "cache").exists(), "built although switched off"


def test_a_fresh_build_in_a_new_cache_loads_and_works(fresh_native):
    lib = native.library()
    assert lib is not None and len(list((fresh_native / "cache" / "native").glob("libsae_native-*.so"))) == 1
    pre = torch.randn(3, 40)
    assert_same_selection(native.topk_rows(pre, None, 4, relu=False), pre, None, 4, False)
    assert os.environ["SAE_CACHE_DIR"] == str(fresh_native / "cache")
