"""GPTQ's per-column step in C (offq.kernels.gptq_columns) against the NumPy step it replaced:
bit for bit on random and adversarial inputs, in both working precisions (float64, float32), and
every argument validated in the binding; its lazy block update (offq.kernels.gptq_block_update)
against NumPy's product, to rounding."""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels import gptq_block_update, gptq_columns, threads
from offq.quant.grid import dequantize_codes, quantize_codes


def numpy_step(wt, orig, err, s, codes, scale, zero, column_group, block_start, first, end,
               sub_end, bits):
    """The per-column loop of GPTQ's sub-block in NumPy (float32 grid; error and updates in
    wt's dtype)."""
    work = wt.dtype
    for i in range(first, end):
        grp = column_group[i]
        x = wt[i].astype(np.float32)
        q = quantize_codes(x, scale[:, grp], zero[:, grp], bits)
        qx = dequantize_codes(q, scale[:, grp], zero[:, grp])
        codes[i] = q
        e = qx.astype(work) - orig[i].astype(work)
        err[i - block_start] = e
        if i + 1 < sub_end:
            wt[i + 1:sub_end] -= s[i, i + 1:sub_end, None] * e


def case(rng, k, n, groups, *, spread=1.0, work=np.float64):
    orig = (rng.standard_normal((k, n)) * spread).astype(np.float32)
    wt = (orig + rng.standard_normal((k, n)) * 0.1 * spread).astype(work)  # as updates left it
    s = np.triu(rng.standard_normal((k, k)), 1) * 0.3
    s[np.diag_indices(k)] = 1.0
    s = s.astype(work)
    scale = rng.uniform(0.05, 0.5, (n, groups)).astype(np.float32)
    zero = np.rint(rng.uniform(-3, 18, (n, groups))).astype(np.float32)
    column_group = rng.integers(0, groups, k).astype(np.int64)
    return wt, orig, s, scale, zero, column_group


def run_both(wt, orig, s, scale, zero, column_group, block_start, first, end, sub_end, bits):
    k, n = wt.shape
    out = []
    for step in (numpy_step, None):
        w = wt.copy()
        err = np.zeros((sub_end - block_start + 1, n), wt.dtype)
        codes = np.zeros((k, n), np.uint8)
        if step is None:
            gptq_columns(w, orig, err, s, codes, scale, zero, column_group,
                         block_start=block_start, first=first, end=end, sub_end=sub_end,
                         bits=bits)
        else:
            step(w, orig, err, s, codes, scale, zero, column_group, block_start, first, end,
                 sub_end, bits)
        out.append((w, err, codes))
    return out


@pytest.mark.parametrize("work", [np.float64, np.float32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 300, 1537])  # one output, odd, one chunk, several chunks
def test_matches_numpy_bit_for_bit(bits, n, work):
    rng = np.random.default_rng(bits * 1000 + n)
    k = 40
    wt, orig, fs, scale, zero, cg = case(rng, k, n, groups=5, work=work)
    for nthreads in (1, 2):
        with threads(nthreads):
            (w0, e0, c0), (w1, e1, c1) = run_both(wt, orig, fs, scale, zero, cg, 8, 10, 21, 24,
                                                  bits)
        np.testing.assert_array_equal(c1, c0)
        np.testing.assert_array_equal(e1, e0)
        np.testing.assert_array_equal(w1, w0)


@pytest.mark.parametrize("work", [np.float64, np.float32])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_threaded_calls_match_numpy(nthreads, work):
    """A call large enough to start the thread team (n >= 512 outputs and (end - first) * n >=
    65536, as GPTQ's gate/up and down_proj runs are), with a chunk count that does not divide
    evenly."""
    rng = np.random.default_rng(11)
    wt, orig, fs, scale, zero, cg = case(rng, 40, 8193, groups=3, work=work)
    with threads(nthreads):
        (w0, e0, c0), (w1, e1, c1) = run_both(wt, orig, fs, scale, zero, cg, 0, 0, 16, 16, 4)
    np.testing.assert_array_equal(c1, c0)
    np.testing.assert_array_equal(e1, e0)
    np.testing.assert_array_equal(w1, w0)


def test_gptq_of_a_weight_without_outputs():
    from offq.quantizers.gptq import gptq_quantize

    q = gptq_quantize(np.ones((0, 16), np.float32), np.eye(16), bits=4)
    assert q.codes.shape == (0, 16)


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("work", [np.float64, np.float32])
def test_adversarial_values(work):
    """Ties of round-half-to-even, values far outside the grid (clamped to 0 and 2^b - 1),
    zero-points outside the code range, a subnormal scale, huge weights."""
    rng = np.random.default_rng(7)
    k, n = 16, 513
    wt, orig, fs, scale, zero, cg = case(rng, k, n, groups=3, work=work)
    scale[:] = 0.25
    wt[0] = (np.arange(n) - n // 2) * 0.125  # multiples of scale / 2: every rounding is a tie
    wt[1] = rng.choice([-1e30, 1e30, -3e38, 3e38], n)
    wt[2] = rng.standard_normal(n) * 1e6
    zero[:, 1] = rng.choice([-40.0, 55.0], n)
    scale[::7, 2] = np.float32(1e-40)
    cg[:4] = [0, 1, 2, 0]
    for bits in (2, 4):
        (w0, e0, c0), (w1, e1, c1) = run_both(wt, orig, fs, scale, zero, cg, 0, 0, 4, 9, bits)
        np.testing.assert_array_equal(c1, c0)
        np.testing.assert_array_equal(e1, e0)
        np.testing.assert_array_equal(w1, w0)
    assert set(np.unique(c0[1])) <= {0, 15}


def test_only_its_rows_and_columns_change():
    rng = np.random.default_rng(3)
    k, n = 30, 64
    wt, orig, fs, scale, zero, cg = case(rng, k, n, groups=2)
    w = wt.copy()
    err = np.full((12, n), 7.0)
    codes = np.full((k, n), 99, np.uint8)
    gptq_columns(w, orig, err, fs, codes, scale, zero, cg, block_start=10, first=12, end=15,
                 sub_end=18, bits=4)
    np.testing.assert_array_equal(w[:13], wt[:13])  # row 12 is read, never written
    np.testing.assert_array_equal(w[18:], wt[18:])
    assert not np.array_equal(w[13:18], wt[13:18])
    assert (codes[:12] == 99).all() and (codes[15:] == 99).all() and (codes[12:15] <= 15).all()
    assert (err[:2] == 7).all() and (err[5:] == 7).all()


def valid_args():
    rng = np.random.default_rng(0)
    wt, orig, fs, scale, zero, cg = case(rng, 8, 5, groups=2)
    return dict(wt=wt, orig=orig, err=np.zeros((8, 5)), s=fs, codes=np.zeros((8, 5), np.uint8),
                scale=scale, zero=zero, column_group=cg, block_start=0, first=0, end=4,
                sub_end=8, bits=4)


def call(**changes):
    args = valid_args()
    args.update(changes)
    pos = [args.pop(name) for name in ("wt", "orig", "err", "s", "codes", "scale", "zero",
                                       "column_group")]
    gptq_columns(*pos, **args)


def test_valid_call_runs():
    call()


def test_an_empty_run_is_a_no_op():
    args = valid_args()
    wt = args["wt"].copy()
    call(err=np.zeros((0, 5)), block_start=4, first=4, end=4, sub_end=4, wt=args["wt"])
    np.testing.assert_array_equal(args["wt"], wt)


@pytest.mark.parametrize("changes, error, match", [
    (dict(wt=np.zeros((8, 5), np.float16)), TypeError, "wt: expected dtype float64"),
    (dict(wt=np.zeros((8, 5), np.float32)), TypeError, "err: expected dtype float32"),
    (dict(wt=np.zeros((8, 5), np.float32), err=np.zeros((8, 5), np.float32)), TypeError,
     "s: expected dtype float32"),
    (dict(wt=np.zeros((8, 10))[:, ::2]), ValueError, "wt: expected a C-contiguous"),
    (dict(err=np.zeros((8, 4))), ValueError, r"err: expected shape \[8, 5\]"),
    (dict(wt=np.zeros((0, 5))), ValueError, r"wt: expected a non-empty matrix, got shape \[0, 5\]"),
    (dict(scale=np.ones((5, 0), np.float32)), ValueError, "scale: expected a non-empty matrix"),
    (dict(err=np.zeros((3, 5))), ValueError, "err: expected at least sub_end - block_start"),
    (dict(s=np.eye(7)), ValueError, r"s: expected shape \[8, 8\]"),
    (dict(s=np.eye(8, dtype=np.float32)), TypeError, "s: expected dtype float64"),
    (dict(orig=np.zeros((8, 5))), TypeError, "orig: expected dtype float32"),
    (dict(orig=np.zeros((8, 4), np.float32)), ValueError, r"orig: expected shape \[8, 5\]"),
    (dict(codes=np.zeros((8, 5), np.int8)), TypeError, "codes: expected dtype uint8"),
    (dict(scale=np.ones((4, 2), np.float32)), ValueError, r"scale: expected shape \[5, 2\]"),
    (dict(zero=np.zeros((5, 3), np.float32)), ValueError, r"zero: expected shape \[5, 2\]"),
    (dict(column_group=np.zeros(7, np.int64)), ValueError, "column_group: expected length 8"),
    (dict(column_group=np.full(8, 2, np.int64)), ValueError, "column_group: entry 0 is 2"),
    (dict(column_group=np.full(8, -1, np.int64)), ValueError, "column_group: entry 0 is -1"),
    (dict(first=5, end=4), ValueError, "end: expected 0 <= block_start <= first <= end"),
    (dict(end=2 ** 63 - 1), ValueError, "end: expected 0 <= block_start"),
    (dict(block_start=-1), ValueError, "block_start: expected 0 <="),
    (dict(sub_end=9), ValueError, "sub_end: expected 0 <= block_start"),
    (dict(first=3, block_start=4), ValueError, "first: expected"),
    (dict(bits=5), ValueError, "bits: expected one of 2, 3, 4, 8"),
    (dict(bits=4.0), TypeError, "bits"),
    (dict(first=np.int64(0).reshape(1)), TypeError, "first"),
])
def test_bad_arguments_are_named(changes, error, match):
    with pytest.raises(error, match=match):
        call(**changes)


@pytest.mark.parametrize("what, value, match", [
    ("scale", 0.0, r"scale: entry \[1, 0\] must be finite and > 0"),
    ("scale", np.nan, r"scale: entry \[1, 0\]"),
    ("scale", -1.0, r"scale: entry \[1, 0\]"),
    ("zero", np.inf, r"zero: entry \[1, 0\] is not finite"),
    ("factor", np.nan, r"s: entry \[2, 5\] is not finite"),
    ("factor", np.inf, r"s: entry \[2, 5\] is not finite"),
    ("orig", np.nan, r"orig: entry \[3, 1\] is not finite"),
    ("wt", np.nan, r"wt: entry \[3, 1\] is not finite"),  # once coded 0 with a finite error
    ("wt", -np.inf, r"wt: entry \[3, 1\] is not finite"),
])
def test_bad_values_where_read_are_named(what, value, match):
    args = valid_args()
    args["column_group"][:] = 0
    if what == "factor":
        args["s"][2, 5] = value
    elif what in ("orig", "wt"):
        args[what][3, 1] = value
    else:
        args[what][1, 0] = value
    with pytest.raises(ValueError, match=match):
        call(**{k: v for k, v in args.items()})


def test_bad_values_outside_the_call_are_not_read():
    args = valid_args()
    args["column_group"][:] = 0
    args["scale"][:, 1] = np.nan  # group 1 is not used by the call's columns
    args["s"][6, 7] = np.nan  # row 6 is outside first..end
    args["s"][1, 0] = np.nan  # below the diagonal: never read
    args["s"][3, 3] = np.nan  # the diagonal (1 by definition): never read
    args["orig"][5] = np.nan  # column 5 is outside first..end
    call(**args)


@pytest.mark.parametrize("out, other", [("wt", "s"), ("wt", "orig"), ("err", "wt"),
                                        ("codes", "scale")])
def test_outputs_must_not_share_memory(out, other):
    args = valid_args()
    buf = np.zeros(4096, np.uint8)
    shape = {"wt": (8, 5), "orig": (8, 5), "err": (8, 5), "s": (8, 8), "codes": (8, 5),
             "scale": (5, 2)}
    dtype = {"wt": np.float64, "orig": np.float32, "err": np.float64, "s": np.float64,
             "codes": np.uint8, "scale": np.float32}
    for name in (out, other):
        count = int(np.prod(shape[name]))
        view = buf[:count * np.dtype(dtype[name]).itemsize].view(dtype[name]).reshape(shape[name])
        view[...] = args[name]
        args[name] = view
    with pytest.raises(ValueError, match=f"{out}: must not share memory with {other}"):
        call(**args)


# ------------------------------------------------------------------------- the lazy block update
def block_case(rng, k=300, n=70, rows=40):
    wt = rng.standard_normal((k, n))
    s = np.triu(rng.standard_normal((k, k)), 1)
    s[np.diag_indices(k)] = 1.0
    err = rng.standard_normal((rows, n))
    return wt, err, s


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("block_start, first, last, t0, t1", [
    (0, 0, 40, 40, 300),      # a finished block onto every later column
    (20, 36, 52, 52, 60),     # a sub-block onto the rest of its block
    (0, 0, 1, 299, 300),      # one column onto the last row
    (10, 10, 10, 10, 300),    # no columns: nothing changes
    (0, 0, 40, 60, 60),       # no rows: nothing changes
])
def test_block_update_matches_numpy(nthreads, block_start, first, last, t0, t1):
    rng = np.random.default_rng(first * 7 + t0)
    wt, err, s = block_case(rng)
    want = wt.copy()
    want[t0:t1] -= s[first:last, t0:t1].T @ err[first - block_start:last - block_start]
    with threads(nthreads):
        gptq_block_update(wt, err, s, block_start=block_start, first=first, last=last, t0=t0,
                          t1=t1)
    np.testing.assert_allclose(wt, want, rtol=1e-13, atol=1e-12)
    untouched = np.ones(wt.shape[0], bool)
    untouched[t0:t1] = False
    np.testing.assert_array_equal(wt[untouched], want[untouched])  # other rows: exactly


@pytest.mark.parametrize("nthreads", [1, 2])
def test_block_update_in_float32_matches_numpy(nthreads):
    """float32 wt, err and s: sgemm, NumPy's float64 product to float32's rounding."""
    rng = np.random.default_rng(9)
    wt, err, s = (a.astype(np.float32) for a in block_case(rng))
    want64 = wt.astype(np.float64)
    want64[40:] -= s[0:40, 40:].astype(np.float64).T @ err.astype(np.float64)
    with threads(nthreads):
        gptq_block_update(wt, err, s, block_start=0, first=0, last=40, t0=40, t1=300)
    assert wt.dtype == np.float32
    np.testing.assert_allclose(wt, want64, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(wt[:40], want64[:40].astype(np.float32))  # rows above t0


def test_block_update_with_many_outputs():
    """gate/up's stacked weight: n = 17920 outputs, a wide product BLAS splits over threads."""
    rng = np.random.default_rng(5)
    wt, err, s = block_case(rng, k=160, n=17920, rows=32)
    want = wt.copy()
    want[32:] -= s[0:32, 32:].T @ err
    with threads(2):
        gptq_block_update(wt, err, s, block_start=0, first=0, last=32, t0=32, t1=160)
    np.testing.assert_allclose(wt, want, rtol=1e-13, atol=1e-12)


def block_call(**changes):
    rng = np.random.default_rng(0)
    wt, err, s = block_case(rng, k=12, n=5, rows=4)
    args = dict(wt=wt, err=err, s=s, block_start=0, first=0, last=4, t0=4, t1=12)
    args.update(changes)
    gptq_block_update(args.pop("wt"), args.pop("err"), args.pop("s"), **args)


@pytest.mark.parametrize("changes, error, match", [
    (dict(wt=np.zeros((12, 5), np.int64)), TypeError, "wt: expected dtype float64"),
    (dict(wt=np.zeros((12, 5), np.float32)), TypeError, "err: expected dtype float32"),
    (dict(wt=np.zeros((12, 5), np.float32), err=np.zeros((4, 5), np.float32)), TypeError,
     "s: expected dtype float32"),
    (dict(wt=np.zeros((12, 10))[:, ::2]), ValueError, "wt: expected a C-contiguous"),
    (dict(err=np.zeros((4, 6))), ValueError, r"err: expected shape \[4, 5\]"),
    (dict(err=np.zeros((3, 5))), ValueError, "err: expected at least last - block_start = 4"),
    (dict(s=np.eye(11)), ValueError, r"s: expected shape \[12, 12\]"),
    (dict(s=np.eye(12, dtype=np.float32)), TypeError, "s: expected dtype float64"),
    (dict(first=5, last=4), ValueError, "last: expected 0 <= block_start <= first <= last"),
    (dict(t0=3), ValueError, "t0: expected"),
    (dict(t1=13), ValueError, "t1: expected"),
    (dict(block_start=-1), ValueError, "block_start: expected"),
    (dict(t1=2 ** 63 - 1), ValueError, "t1: expected"),
    (dict(first=1.0), TypeError, "first"),
])
def test_block_update_bad_arguments_are_named(changes, error, match):
    with pytest.raises(error, match=match):
        block_call(**changes)


def test_block_update_read_only_wt_is_refused():
    rng = np.random.default_rng(1)
    wt, err, s = block_case(rng, k=12, n=5, rows=4)
    wt.flags.writeable = False
    with pytest.raises(ValueError, match="wt"):
        gptq_block_update(wt, err, s, block_start=0, first=0, last=4, t0=4, t1=12)


@pytest.mark.parametrize("where, match", [
    (("s", (2, 7)), r"s: entry \[2, 7\] is not finite"),
    (("err", (3, 1)), r"err: entry \[3, 1\] is not finite"),
])
def test_block_update_non_finite_read_is_named(where, match):
    rng = np.random.default_rng(2)
    wt, err, s = block_case(rng, k=12, n=5, rows=4)
    name, at = where
    {"s": s, "err": err}[name][at] = np.nan
    before = wt.copy()
    with pytest.raises(ValueError, match=match):
        gptq_block_update(wt, err, s, block_start=0, first=0, last=4, t0=4, t1=12)
    np.testing.assert_array_equal(wt, before)  # refused before anything was written


def test_block_update_reads_only_its_entries():
    rng = np.random.default_rng(3)
    wt, err, s = block_case(rng, k=12, n=5, rows=6)
    s[5, 8] = s[1, 2] = s[2, 0] = np.nan  # rows past last, columns before t0, below the diagonal
    err[4:] = np.inf  # rows past last - block_start
    gptq_block_update(wt, err, s, block_start=0, first=0, last=4, t0=4, t1=12)
    assert np.all(np.isfinite(wt))


def test_block_update_must_not_write_its_inputs():
    rng = np.random.default_rng(4)
    buf = rng.standard_normal(12 * 12)
    s = buf.reshape(12, 12)
    with pytest.raises(ValueError, match="wt: must not share memory with s"):
        gptq_block_update(buf[:60].reshape(12, 5), np.ones((4, 5)), s, block_start=0, first=0,
                          last=4, t0=4, t1=12)
