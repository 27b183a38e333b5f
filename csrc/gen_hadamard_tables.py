#!/usr/bin/env python3
"""Generate csrc/hadamard_tables.h: Hadamard matrices of the orders m = 4 * odd that offq supports.

A Hadamard matrix of order n = m * 2^k is built as H_m (x) H_{2^k} (Kronecker product, see
hadamard.h); this script writes the small factors H_m as packed bit tables. They come from the two
classical constructions of R. E. A. C. Paley (1933), over a finite field GF(q) with quadratic
character chi (chi(0) = 0, chi(x) = 1 for nonzero squares, -1 otherwise) and the Jacobsthal matrix
Q[a, b] = chi(a - b):

  Paley I   q = 3 (mod 4), order q + 1:  S = [[0, 1^T], [-1, Q]] is skew (S^T = -S) with
            S S^T = q I, so H = I + S is Hadamard.
  Paley II  q = 1 (mod 4), order 2(q + 1): C = [[0, 1^T], [1, Q]] is symmetric with C^2 = q I;
            H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]] is Hadamard.

Field elements of GF(p^e) are integers 0..q-1 read as base-p digit vectors (coefficients of a
polynomial in the generator, reduced by a monic irreducible polynomial found by search).
Every matrix is checked (H H^T = m I) before it is written. Run:
    python csrc/gen_hadamard_tables.py [OUTPUT_PATH]     (default: csrc/hadamard_tables.h)
"""
from __future__ import annotations

import itertools
import os
import sys

import numpy as np

MAX_ORDER = 200


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


def construct(m: int) -> tuple[np.ndarray, str] | None:
    """A Hadamard matrix of order m (a multiple of 4) by Paley I or II, or None."""
    q = m - 1
    pp = factor_prime_power(q)
    if pp and q % 4 == 3:
        return paley1(q), f"Paley I, q = {q}"
    if m % 2 == 0:
        q = m // 2 - 1
        pp = factor_prime_power(q)
        if pp and q % 4 == 1:
            return paley2(q), f"Paley II, q = {q}"
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
    entries, missing = [], []
    for odd in range(3, MAX_ORDER // 4 + 1, 2):
        m = 4 * odd
        got = construct(m)
        if got is None:
            missing.append(m)
            continue
        h, how = got
        h = normalize_signs(h)
        assert np.all(h[0, :] == 1) and np.all(h[:, 0] == 1)
        assert h.shape == (m, m) and set(np.unique(h)) <= {-1, 1}
        assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64)), f"order {m} not Hadamard"
        entries.append((m, how, pack_rows(h)))

    lines = [
        "/* hadamard_tables.h: GENERATED by csrc/gen_hadamard_tables.py -- do not edit.",
        " *",
        " * Hadamard matrices H_m of order m = 4 * odd (Paley I / Paley II constructions, see the",
        " * generator), packed one row after another, ceil(m / 8) bytes per row: bit j % 8 of byte",
        " * j / 8 of row i is set when H_m[i][j] = -1. Signs are normalised so that row 0 and column 0",
        " * are all ones. Each was checked: H_m H_m^T = m I.",
        f" * Orders 4 * odd <= {MAX_ORDER} without a Paley construction (not supported): "
        + ", ".join(map(str, missing)) + ".",
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
    print(f"wrote {path}: orders {[m for m, _, _ in entries]}; missing {missing}", file=sys.stderr)


if __name__ == "__main__":
    main()
