#!/usr/bin/env python3
"""Generate csrc/hadamard_tables.h: Hadamard matrices of the orders m = 4 * odd that offq supports.

A Hadamard matrix of order n = m * 2^k is built as H_m (x) H_{2^k} (Kronecker product, see
offq.h); this script writes the small factors H_m as packed bit tables. They come from the two
classical constructions of R. E. A. C. Paley (1933), over a finite field GF(q) with quadratic
character chi (chi(0) = 0, chi(x) = 1 for nonzero squares, -1 otherwise) and the Jacobsthal matrix
Q[a, b] = chi(a - b):

  Paley I   q = 3 (mod 4), order q + 1:  S = [[0, 1^T], [-1, Q]] is skew (S^T = -S) with
            S S^T = q I, so H = I + S is Hadamard.
  Paley II  q = 1 (mod 4), order 2(q + 1): C = [[0, 1^T], [1, Q]] is symmetric with C^2 = q I;
            H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]] is Hadamard.

Field elements of GF(p^e) are integers 0..q-1 read as base-p digit vectors (coefficients of a
polynomial in the generator, reduced by a monic irreducible polynomial found by search).

Orders m = 4n (n odd) with neither Paley construction are built as Williamson matrices (1944):
four symmetric circulant +-1 matrices A, B, C, D of order n with A^2 + B^2 + C^2 + D^2 = 4n I,
placed in the array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]. Their first
rows are FOUND HERE by an exhaustive search (williamson_search; no sequence is tabulated): a
symmetric circulant is fixed by c[1..(n-1)/2] (c[0] = 1 after negating the matrix), the condition
is that the periodic autocorrelations sum to 0 at every shift s != 0, the row sums satisfy
a^2 + b^2 + c^2 + d^2 = 4n, and every real DFT value obeys A^(k)^2 + ... + D^(k)^2 = 4n. The search
first looks among sequences constant on the orbits of a subgroup H of the multipliers (Z/nZ)^*
containing -1 (largest H first: few free signs), then with H = {1, -1} (all symmetric ones). For
each sum decomposition it is a meet-in-the-middle: pairs (A, B) (A one representative per
multiplier orbit) are hashed by their autocorrelation sums, pairs (C, D) are streamed and look up
the negated vector; a hit is checked exactly. The result does not depend on the hash weights.

Every matrix is checked (H H^T = m I) before it is written. Run:
    python csrc/gen_hadamard_tables.py [OUTPUT_PATH]     (default: csrc/hadamard_tables.h)
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import time

import numpy as np

MAX_ORDER = 200
# Williamson search limits: at most 2^WILLIAMSON_MAX_FREE candidate sequences per subgroup H.
WILLIAMSON_MAX_FREE = 19
WILLIAMSON_SEED = 1944  # hash weights only: which quadruple is found does not depend on them


def factor_prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, e) with q = p^e for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    return (p, e) if r == 1 else None


class GF:
    """The finite field GF(p^e), elements encoded as integers 0..q-1 (base-p coefficient digits)."""

    def __init__(self, p: int, e: int):
        self.p, self.e, self.q = p, e, p**e
        self.poly = self._find_irreducible() if e > 1 else None

    def _digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.e)]

    def _encode(self, d: list[int]) -> int:
        return sum(c * self.p**i for i, c in enumerate(d))

    def _find_irreducible(self) -> list[int]:
        # monic x^e + c_{e-1} x^{e-1} + ... + c_0 with no root is irreducible for e <= 3
        assert self.e <= 3, "only degrees up to 3 are needed"
        for coeffs in itertools.product(range(self.p), repeat=self.e):
            if coeffs[0] == 0:
                continue
            if all(
                (sum(c * x**i for i, c in enumerate(coeffs)) + x**self.e) % self.p != 0
                for x in range(self.p)
            ):
                return list(coeffs)
        raise RuntimeError("no irreducible polynomial found")

    def sub(self, a: int, b: int) -> int:
        da, db = self._digits(a), self._digits(b)
        return self._encode([(x - y) % self.p for x, y in zip(da, db)])

    def mul(self, a: int, b: int) -> int:
        if self.e == 1:
            return (a * b) % self.p
        da, db = self._digits(a), self._digits(b)
        prod = [0] * (2 * self.e - 1)
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                prod[i + j] = (prod[i + j] + x * y) % self.p
        for k in range(len(prod) - 1, self.e - 1, -1):  # reduce x^k = -sum c_i x^{k-e+i}
            c = prod[k]
            if c:
                prod[k] = 0
                for i, ci in enumerate(self.poly):
                    prod[k - self.e + i] = (prod[k - self.e + i] - c * ci) % self.p
        return self._encode(prod[: self.e])

    def chi_table(self) -> np.ndarray:
        squares = {self.mul(a, a) for a in range(1, self.q)}
        return np.array([0] + [1 if a in squares else -1 for a in range(1, self.q)], dtype=np.int64)


def jacobsthal(f: GF) -> np.ndarray:
    chi = f.chi_table()
    return np.array([[chi[f.sub(a, b)] for b in range(f.q)] for a in range(f.q)], dtype=np.int64)


def paley1(q: int) -> np.ndarray:
    f = GF(*factor_prime_power(q))
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal(f)
    return np.eye(q + 1, dtype=np.int64) + s


def paley2(q: int) -> np.ndarray:
    f = GF(*factor_prime_power(q))
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jacobsthal(f)
    return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])


# --------------------------------------------------------------------------------------------
# Williamson matrices, found by search
# --------------------------------------------------------------------------------------------


def multiplier_subgroups(n: int) -> list[tuple[int, ...]]:
    """Subgroups <-1, g> of (Z/nZ)^* (g over the units), largest first, then lexicographic."""
    units = [u for u in range(1, n) if math.gcd(u, n) == 1]
    found = set()
    for g in units:
        h = {1}
        while True:
            grown = h | {(x * y) % n for x in h for y in (g, n - 1)}
            if grown == h:
                break
            h = grown
        found.add(tuple(sorted(h)))
    return sorted(found, key=lambda h: (-len(h), h))


def orbits(n: int, group: tuple[int, ...]) -> list[list[int]]:
    """Orbits of the multiplier group on the nonzero residues mod n, by smallest element."""
    seen, out = set(), []
    for x in range(1, n):
        if x not in seen:
            orb = sorted({(g * x) % n for g in group})
            seen.update(orb)
            out.append(orb)
    return out


def _paf(x: np.ndarray, shifts: list[int]) -> np.ndarray:
    """Periodic autocorrelations sum_j x[j] x[j + s] of each row of x at the given shifts."""
    x = x.astype(np.int32)
    return np.stack([(x * np.roll(x, -s, axis=1)).sum(1) for s in shifts], 1)


def williamson_check(seqs: list[np.ndarray]) -> bool:
    """The four first rows give symmetric circulant +-1 matrices with sum of squares 4n I."""
    n = len(seqs[0])
    for x in seqs:
        if not (set(np.unique(x)) <= {-1, 1} and all(x[j] == x[n - j] for j in range(1, n))):
            return False
    return bool(np.all(sum(_paf(x[None, :], list(range(1, n)))[0] for x in seqs) == 0))


def _search_in_group(n: int, group: tuple[int, ...], log) -> tuple[tuple[int, ...], list] | None:
    """Williamson first rows constant on the orbits of `group` (a_0 = 1), or None if none exist.

    Exhaustive: every candidate passing the spectral bound is considered, for every decomposition
    of 4n into four row sums, up to permuting A..D and applying a multiplier to all four."""
    orbs = orbits(n, group)
    t = len(orbs)
    half = (n - 1) // 2
    # all 2^t candidates: sign pattern over orbits, c[0] = 1
    member = np.zeros((t, n), dtype=np.int8)
    for i, orb in enumerate(orbs):
        member[i, orb] = 1
    bits = (np.arange(2**t, dtype=np.int64)[:, None] >> np.arange(t)[None, :]) & 1
    # float32 BLAS product (exact: small integers) instead of NumPy's slow integer matmul
    x = ((1 - 2 * bits).astype(np.float32) @ member.astype(np.float32)).astype(np.int8)
    x[:, 0] = 1
    # spectral bound: the real DFT value at every k != 0 has square <= 4n
    k = np.arange(1, half + 1)
    cosines = np.cos(2 * np.pi * np.outer(np.arange(n), k) / n)
    psd = (x.astype(np.float64) @ cosines) ** 2
    keep = psd.max(1) <= 4 * n + 1e-6
    x, psd, code = x[keep], psd[keep], np.arange(2**t, dtype=np.int64)[keep]
    sums = x.sum(1, dtype=np.int64)
    # autocorrelations are invariant under the group: one shift per orbit suffices for the key
    shifts = [orb[0] for orb in orbs]
    paf = _paf(x, shifts).astype(np.int64)
    weights = np.random.default_rng(WILLIAMSON_SEED).integers(-(2**62), 2**62, size=len(shifts))
    key = paf @ weights  # wraps modulo 2^64; linear, so a pair's key is the sum of the two keys
    classes = {int(v): np.nonzero(sums == v)[0] for v in np.unique(sums)}
    values = sorted(classes)
    decompositions = [q for q in itertools.combinations_with_replacement(values, 4)
                      if sum(v * v for v in q) == 4 * n]
    log(f"  n = {n}, |H| = {len(group)}: {t} orbits, {len(x)} of {2**t} candidates pass the "
        f"spectral bound, row-sum decompositions {decompositions}")
    if not decompositions:
        return None

    # canonical representatives under multipliers (they act on all four sequences at once)
    units = [u for u in range(2, n) if math.gcd(u, n) == 1 and u not in group]
    weight_of_orbit = np.int64(1) << np.arange(t, dtype=np.int64)
    pos = {j: i for i, orb in enumerate(orbs) for j in orb}

    def canonical(idx: np.ndarray) -> np.ndarray:
        keep = np.ones(len(idx), dtype=bool)
        for u in units:
            # orbit i of the image sequence y[j] = x[u j] takes the sign of orbit pos[u * orb_i[0]]
            src = [pos[(u * orb[0]) % n] for orb in orbs]
            img = (((code[idx][:, None] >> np.array(src)[None, :]) & 1) * weight_of_orbit).sum(1)
            keep &= code[idx] <= img
        return idx[keep]

    bound = 4 * n + 1e-6
    for dec in decompositions:
        # split {a, b | c, d}: canonical A on the stored side, the larger product streamed
        best = None
        for i, j in itertools.combinations(range(4), 2):
            rest = [r for r in range(4) if r not in (i, j)]
            left = (dec[i], dec[j])
            right = (dec[rest[0]], dec[rest[1]])
            size_l = len(classes[left[0]]) * len(classes[left[1]]) / max(1, len(units) + 1)
            cand = (size_l, left, right)
            if best is None or cand[0] < best[0]:
                best = cand
        _, (va, vb), (vc, vd) = best
        ia = canonical(classes[va])
        ib, ic, id_ = classes[vb], classes[vc], classes[vd]
        # stored side: all (A, B) pairs within the spectral bound, sorted by key
        la, lb, lk = [], [], []
        for start in range(0, len(ia), 256):
            a = ia[start:start + 256]
            ok = np.ones((len(a), len(ib)), dtype=bool)
            for f in range(half):
                ok &= psd[a, f][:, None] + psd[ib, f][None, :] <= bound
            r, c = np.nonzero(ok)
            la.append(a[r])
            lb.append(ib[c])
            lk.append(key[a[r]] + key[ib[c]])
        la, lb, lk = np.concatenate(la), np.concatenate(lb), np.concatenate(lk)
        order = np.argsort(lk, kind="stable")
        la, lb, lk = la[order], lb[order], lk[order]
        if len(lk) == 0:
            log(f"    row sums {dec}: no (A, B) pair within the spectral bound")
            continue
        # streamed side: (C, D) pairs (C <= D when the sums agree), looked up by the negated key
        for start in range(0, len(ic), 256):
            c_idx = ic[start:start + 256]
            ok = np.ones((len(c_idx), len(id_)), dtype=bool)
            if vc == vd:
                ok &= c_idx[:, None] <= id_[None, :]
            for f in range(half):
                ok &= psd[c_idx, f][:, None] + psd[id_, f][None, :] <= bound
            r, c = np.nonzero(ok)
            want = -(key[c_idx[r]] + key[id_[c]])
            at = np.searchsorted(lk, want)
            hit = np.nonzero((at < len(lk)) & (lk[np.minimum(at, len(lk) - 1)] == want))[0]
            for h in hit:
                p = at[h]
                while p < len(lk) and lk[p] == want[h]:
                    seqs = [x[la[p]], x[lb[p]], x[c_idx[r[h]]], x[id_[c[h]]]]
                    if williamson_check(seqs):
                        return (va, vb, vc, vd), [s.astype(np.int64) for s in seqs]
                    p += 1
        log(f"    row sums {dec}: {len(lk)} (A, B) pairs stored, no solution")
    return None


def williamson_search(n: int, log=lambda msg: None) -> tuple[list[np.ndarray], str] | None:
    """First rows of Williamson matrices of odd order n, or None within WILLIAMSON_MAX_FREE."""
    for group in multiplier_subgroups(n):
        t = len(orbits(n, group))
        if t > WILLIAMSON_MAX_FREE:
            log(f"  n = {n}, |H| = {len(group)}: {t} orbits, 2^{t} candidates exceed the search "
                f"limit 2^{WILLIAMSON_MAX_FREE}, skipped")
            continue
        t0 = time.time()
        got = _search_in_group(n, group, log)
        if got is not None:
            sums, seqs = got
            where = ("symmetric" if len(group) == 2 else
                     f"constant on the orbits of the multipliers {{{', '.join(map(str, group))}}}")
            log(f"  found in {time.time() - t0:.1f} s")
            return seqs, f"row sums (a, b, c, d) = {sums}, first rows {where}"
    return None


def williamson(n: int, log=lambda msg: None) -> tuple[np.ndarray, str] | None:
    """A Hadamard matrix of order 4n from Williamson matrices found by williamson_search."""
    got = williamson_search(n, log)
    if got is None:
        return None
    seqs, how = got
    a, b, c, d = (np.array([[s[(j - i) % n] for j in range(n)] for i in range(n)]) for s in seqs)
    h = np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])
    return h, f"Williamson, m = {n}, {how}"


def construct(m: int, log=lambda msg: None) -> tuple[np.ndarray, str] | None:
    """A Hadamard matrix of order m (a multiple of 4) by Paley I or II, else Williamson, or None."""
    q = m - 1
    pp = factor_prime_power(q)
    if pp and q % 4 == 3:
        return paley1(q), f"Paley I, q = {q}"
    if m % 2 == 0:
        q = m // 2 - 1
        pp = factor_prime_power(q)
        if pp and q % 4 == 1:
            return paley2(q), f"Paley II, q = {q}"
    if m % 4 == 0 and (m // 4) % 2 == 1:
        return williamson(m // 4, log)
    return None


def normalize_signs(h: np.ndarray) -> np.ndarray:
    """Flip column then row signs so that row 0 and column 0 are all ones (still Hadamard).

    With row 0 all ones, H_m (x) H_{2^k} keeps Sylvester's property that input index 0 maps to the
    all-ones row, which the OffQ rotation relies on (the outlier becomes a constant per block)."""
    h = h * h[0, :][None, :]
    return h * h[:, 0][:, None]


def pack_rows(h: np.ndarray) -> list[int]:
    """Bit j of byte (i * ceil(m/8) + j // 8) is 1 when H[i, j] = -1."""
    m = h.shape[0]
    stride = (m + 7) // 8
    out = []
    for i in range(m):
        row = [0] * stride
        for j in range(m):
            if h[i, j] < 0:
                row[j // 8] |= 1 << (j % 8)
        out += row
    return out


def main() -> None:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.time()
    entries, missing = [], []
    for odd in range(3, MAX_ORDER // 4 + 1, 2):
        m = 4 * odd
        t0 = time.time()
        got = construct(m, log)
        if got is None:
            log(f"order {m}: no construction ({time.time() - t0:.1f} s)")
            missing.append(m)
            continue
        h, how = got
        log(f"order {m}: {how} ({time.time() - t0:.1f} s)")
        h = normalize_signs(h)
        assert np.all(h[0, :] == 1) and np.all(h[:, 0] == 1)
        assert h.shape == (m, m) and set(np.unique(h)) <= {-1, 1}
        assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64)), f"order {m} not Hadamard"
        entries.append((m, how, pack_rows(h)))

    lines = [
        "/* hadamard_tables.h: GENERATED by csrc/gen_hadamard_tables.py -- do not edit.",
        " *",
        " * Hadamard matrices H_m of order m = 4 * odd (Paley I / Paley II constructions, else",
        " * Williamson matrices found by search, see the generator), packed one row after another,",
        " * ceil(m / 8) bytes per row: bit j % 8 of byte j / 8 of row i is set when H_m[i][j] = -1.",
        " * Signs are normalised so that row 0 and column 0 are all ones. Each was checked:",
        " * H_m H_m^T = m I.",
        f" * Orders 4 * odd <= {MAX_ORDER} without a construction here (not supported): "
        + (", ".join(map(str, missing)) if missing else "none") + ".",
        " */",
        "#ifndef OFFQ_HADAMARD_TABLES_H",
        "#define OFFQ_HADAMARD_TABLES_H",
        "",
        "#include <stdint.h>",
        "",
    ]
    for m, how, data in entries:
        lines.append(f"/* order {m}: {how} */")
        lines.append(f"static const uint8_t offq_had_{m}[{len(data)}] = {{")
        for i in range(0, len(data), 16):
            lines.append("    " + ", ".join(f"0x{b:02x}" for b in data[i : i + 16]) + ",")
        lines.append("};")
    lines += [
        "",
        "typedef struct {",
        "    int64_t order;",
        "    const uint8_t *bits;",
        "} offq_had_table;",
        "",
        "static const offq_had_table offq_had_tables[] = {",
    ]
    lines += [f"    {{{m}, offq_had_{m}}}," for m, _, _ in entries]
    lines += [
        "};",
        "",
        f"#define OFFQ_HAD_NUM_TABLES {len(entries)}",
        "#define OFFQ_HAD_MAX_ORDER " + str(max(m for m, _, _ in entries)),
        "",
        "#endif",
        "",
    ]
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "hadamard_tables.h")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)
    log(f"wrote {path}: orders {[m for m, _, _ in entries]}; missing {missing} "
        f"({time.time() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
