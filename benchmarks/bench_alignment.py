"""Does it matter where an array starts? The same operands copied to buffers that start 0, 16 or
32 bytes past a cache line (NumPy's large buffers start at 16 mod 64), timed interleaved.

    python benchmarks/bench_alignment.py                 # wq i8 kv
    python benchmarks/bench_alignment.py --only wq --threads 1

- ``wq``: ``matmul_wq`` at M = 1, 4096 x 4096, g128, W4 and W8, each SIMD variant (the packed
  weight; ``pack_wq`` allocates it on a cache line because W8 on AVX-512 needed it);
- ``i8``: ``matmul_i8`` at M = 1 on a Qwen2.5-sized int8 LM head, 151936 x 1536, g128;
- ``kv``: SmolLM2-135M QuaRot-style + RTN W4A4KV4 quantized in process, the fused decoder's 4-bit
  KV cache as NumPy allocates it against copied to aligned buffers (C prefill, float attention).

Per case the median and minimum of interleaved rounds (kv: best tokens/s). Random operands, seed 0.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.bench.machine import describe_machine  # noqa: E402
from offq.kernels import threads  # noqa: E402

OFFSETS = {"0 mod 64": 0, "16 mod 64": 16, "32 mod 64": 32}


def placed(a: np.ndarray, offset: int) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts ``offset`` bytes past a cache line."""
    buf = np.empty(a.nbytes + 128, np.uint8)
    start = -buf.ctypes.data % 64 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def interleaved(calls: dict, rounds: int, reps: int) -> dict:
    """{name: (median, min) microseconds a call} over `rounds` rounds of `reps` calls each."""
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - t) / reps * 1e6)
    return {name: (float(np.median(v)), float(min(v))) for name, v in times.items()}


def bench_wq(rng: np.random.Generator) -> list[dict]:
    from offq import _C
    from offq.kernels.matmul_wq import matmul_wq, pack_wq

    k = n = 4096
    group = 128
    simd = _C.simd_info()
    kernels = [kv for kv, flag in (("avx512", "avx512_bw"), ("avx2", "avx2")) if simd[flag]]
    x = rng.standard_normal((1, k), dtype=np.float32)
    out = np.empty((1, n), np.float32)
    rows = []
    for bits in (4, 8):
        packed = pack_wq(rng.integers(0, 1 << bits, (n, k)).astype(np.uint8), bits)
        s = rng.uniform(0.01, 1, (n, k // group)).astype(np.float32)
        z = np.full((n, k // group), 3, np.float32)
        for kern in kernels:
            copies = {name: placed(packed, off) for name, off in OFFSETS.items()}
            calls = {name: (lambda p=p, kern=kern: matmul_wq(x, p, s, z, bits, group, out=out,
                                                               kernel=kern))
                     for name, p in copies.items()}
            rows.append({"case": f"matmul_wq w{bits} g{group} [{kern}] 1x{k}x{n}",
                         "us": interleaved(calls, 30, 5)})
    return rows


def bench_i8(rng: np.random.Generator) -> list[dict]:
    from offq.kernels.matmul_i8 import matmul_i8

    n, k, group = 151936, 1536, 128
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    s = rng.uniform(0.01, 1, (n, k // group)).astype(np.float32)
    x = rng.standard_normal((1, k), dtype=np.float32)
    out = np.empty((1, n), np.float32)
    copies = {name: placed(w, OFFSETS[name]) for name in ("0 mod 64", "16 mod 64")}
    del w
    calls = {name: (lambda a=a: matmul_i8(x, a, s, group, out=out)) for name, a in copies.items()}
    return [{"case": f"matmul_i8 g{group} 1x{k}x{n}", "us": interleaved(calls, 12, 1)}]


def bench_kv() -> list[dict]:
    from offq.bench.e2e import _generate_seconds, _prefill_seconds
    from offq.config import QuantConfig
    from offq.data import eval_windows, load_wikitext2_test
    from offq.formats import open_checkpoint
    from offq.quant import fused
    from offq.recipe.pipeline import quantize

    with open_checkpoint("smollm2-135m") as ckpt:
        result = quantize(ckpt, QuantConfig(method="quarot", w_quantizer="rtn"), None,
                          progress=False)
        ids = eval_windows(ckpt.tokenizer, load_wikitext2_test(), 2048, 1, False)[0]
    model = result.model("fused")
    model.fused_runner.prefill = "c"
    numpy_alloc = fused.FusedKVCache._alloc

    def aligned_alloc(cache, cap):
        return tuple(placed(a, 0) for a in numpy_alloc(cache, cap))

    allocs = {"numpy": numpy_alloc, "0 mod 64": aligned_alloc}
    tests = {"pp512": lambda: 512 / _prefill_seconds(model, ids[:512]),
             "pp2048": lambda: 2048 / _prefill_seconds(model, ids[:2048]),
             "tg64@d1024": lambda: 64 / _generate_seconds(model, int(ids[1024]), 64, ids[:1024])}
    rows = []
    try:
        for test, fn in tests.items():
            best = {name: 0.0 for name in allocs}
            for _ in range(4 if test.startswith("pp") else 3):
                for name, alloc in allocs.items():
                    fused.FusedKVCache._alloc = alloc
                    best[name] = max(best[name], fn())
            rows.append({"case": f"fused W4A4KV4 KV cache, SmolLM2-135M {test}",
                         "tokens_per_s": best})
    finally:
        fused.FusedKVCache._alloc = numpy_alloc
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=("wq", "i8", "kv"), default=["wq", "i8", "kv"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    print(f"# {describe_machine()}", flush=True)
    rows = []
    for t in args.threads:
        with threads(t):
            for part in args.only:
                rng = np.random.default_rng(0)
                got = {"wq": lambda: bench_wq(rng), "i8": lambda: bench_i8(rng),
                       "kv": bench_kv}[part]()
                for row in got:
                    row["threads"] = t
                    vals = row.get("us") or row["tokens_per_s"]
                    unit = "us (median, min)" if "us" in row else "tokens/s (best)"
                    shown = {k: (tuple(round(v, 1) for v in x) if isinstance(x, tuple)
                                 else round(x, 1)) for k, x in vals.items()}
                    print(f"{t} threads  {row['case']}: {unit} {shown}", flush=True)
                rows += got
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": describe_machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
