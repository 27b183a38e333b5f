"""A/B of offq's C core: several builds of ``offq/_C*.so`` loaded side by side in one process,
their calls alternated, so that the speed drift of a shared VM (10-25% within minutes) hits every
build alike.

Copy each build aside first (``cp offq/_C.cpython-*.so /tmp/ab/before.so``, rebuild, copy again),
then:

    python benchmarks/ab_builds.py /tmp/ab/before.so /tmp/ab/after.so [--threads 1] [--rounds 25]

Workloads (SmolLM2-135M's shapes unless stated; the SIMD variant is what the process dispatches to, so prefix
``OFFQ_SIMD_MAX=avx2`` for the AVX2 kernels):
  - ``matmul``: ``matmul_w4a4`` of 2048 tokens (activations asymmetric, groups of 64) against a
    symmetric per-channel 4-bit weight, K x N = 576 x 3072 (gate/up) and 1536 x 576 (down), and
    Qwen2.5-1.5B's gate/up half, 512 tokens (groups of 128) x 1536 x 8960;
  - ``attention``: the 8-bit and the float attention (``attention_kv4``) of 96 queries (32 positions x
    3 heads of a KV head, the last rows of a 2048-token prompt) over a 2048-position 4-bit cache,
    head_dim 64, one group;
  - ``wq``: the weight-only decode product ``matmul_wq`` (M = 1, 4096 x 4096, W4 / W3 / W2,
    groups of 128; its packed weight stays in L3 between calls: the kernels' compute, not DRAM);
  - ``wq-streamed``: the same products, each call a pass over copies of the packed weight filling
    128 MiB, so that every product reads its weight from DRAM as a model's decode does (the
    table's milliseconds are per pass; its ratios are those of one product).
Each build's outputs are compared with the first build's (``identical``: the same bits), then
each workload is timed ``--rounds`` times per build in turn; the table gives min and quartile
milliseconds and the ratio of each build's min to the first's.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def load_build(path: Path) -> ModuleType:
    """An ``offq._C`` extension module from ``path`` (each file its own module object)."""
    spec = importlib.util.spec_from_file_location("offq._C", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matmul_cases(rng: np.random.Generator) -> list[tuple[str, object]]:
    """(name, call(module)) for the W4A4 products (the binding called directly: offq's wrapper
    would call the installed build)."""
    from offq.kernels.quant import quantize

    cases = []
    for m, k, n, group in ((2048, 576, 3072, 64), (2048, 1536, 576, 64), (512, 1536, 8960, 128)):
        qa = quantize(rng.standard_normal((m, k), dtype=np.float32), bits=4, group_size=group)
        qw = quantize(rng.standard_normal((n, k), dtype=np.float32), bits=4, group_size=-1,
                      symmetric=True)

        def call(mod: ModuleType, qa=qa, qw=qw, k=k) -> np.ndarray:
            return mod.matmul_w4a4(qa.codes, qa.scale, qa.zero, qa.group_size, qw.codes, qw.scale,
                                   qw.zero, qw.group_size, k)

        cases.append((f"matmul_w4a4 {m}x{k}x{n} (a groups of {group})", call))
    return cases


def attention_cases(rng: np.random.Generator) -> list[tuple[str, object]]:
    """(name, call(module)) for the 8-bit and the float attention over a 4-bit cache."""
    npos, hd = 2048, 64
    codes = rng.integers(0, 256, (npos, 2, hd // 2), dtype=np.uint8)
    scale = rng.uniform(0.02, 0.3, (npos, 2, 1)).astype(np.float32)
    zero = rng.integers(0, 16, (npos, 2, 1)).astype(np.float32)
    q = (rng.standard_normal((96, hd)) * 0.5).astype(np.float32)
    n = np.repeat(np.arange(npos - 31, npos + 1), 3).astype(np.int64)

    def call(mode: str):
        return lambda mod: mod.attention_kv4(q, codes, scale, zero, n, mode=mode)

    return [(f"attention {mode} 96 q x {npos} pos, hd {hd}", call(mode))
            for mode in ("int8", "float")]


def wq_weights(rng: np.random.Generator):
    """(x, bits, quantized weight, packed codes) of the weight-only decode product at each width
    (M = 1, 4096 x 4096, groups of 128: 2-8 MB of packed weight)."""
    from offq.kernels.matmul_wq import pack_wq
    from offq.kernels.quant import quantize

    k = n = 4096
    x = rng.standard_normal((1, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    for bits in (4, 3, 2):
        qw = quantize(w, bits=bits, group_size=128)
        yield x, bits, qw, pack_wq(qw.unpacked_codes(), bits)


def wq_cases(rng: np.random.Generator) -> list[tuple[str, object]]:
    """(name, call(module)) for the weight-only decode product at each width; L3 holds its
    packed weight between calls."""
    cases = []
    for x, bits, qw, packed in wq_weights(rng):

        def call(mod: ModuleType, x=x, packed=packed, qw=qw, bits=bits) -> np.ndarray:
            return mod.matmul_wq(x, packed, qw.scale, qw.zero, bits, 128, None, "auto")

        cases.append((f"matmul_wq W{bits} g128 1x{x.shape[1]}x{packed.shape[0]}", call))
    return cases


STREAM_BYTES = 128 << 20  # the copies a streamed pass cycles through (4x a 32 MiB L3)


def wq_streamed_cases(rng: np.random.Generator) -> list[tuple[str, object]]:
    """wq_cases' products, each call a pass over copies of the weight filling STREAM_BYTES."""
    cases = []
    for x, bits, qw, packed in wq_weights(rng):
        one = packed.nbytes + qw.scale.nbytes + qw.zero.nbytes
        copies = [(packed.copy(), qw.scale.copy(), qw.zero.copy())
                  for _ in range(-(-STREAM_BYTES // one))]

        def call(mod: ModuleType, x=x, copies=copies, bits=bits) -> np.ndarray:
            for p, s, z in copies:
                out = mod.matmul_wq(x, p, s, z, bits, 128, None, "auto")
            return out

        cases.append((f"matmul_wq W{bits} g128 1x{x.shape[1]}x{packed.shape[0]} streamed, "
                      f"{len(copies)} copies a pass", call))
    return cases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("builds", nargs="+", type=Path, help="copies of offq/_C*.so (first: baseline)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--only", choices=("matmul", "attention", "wq", "wq-streamed"), nargs="+",
                   default=["matmul", "attention", "wq"])
    args = p.parse_args()
    from offq.bench.machine import describe_machine
    from offq.kernels import set_num_threads

    set_num_threads(args.threads)  # (this loads offq's OpenBLAS, which the copies then share)
    builds = {str(b): load_build(b) for b in args.builds}
    for mod in builds.values():
        mod.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cases = []
    if "matmul" in args.only:
        cases += matmul_cases(rng)
    if "attention" in args.only:
        cases += attention_cases(rng)
    if "wq" in args.only:
        cases += wq_cases(rng)
    if "wq-streamed" in args.only:
        cases += wq_streamed_cases(rng)
    print(f"# {describe_machine()}; threads {args.threads}; rounds {args.rounds}; "
          f"OFFQ_SIMD_MAX={os.environ.get('OFFQ_SIMD_MAX', '(unset)')}")
    for name, call in cases:
        outs = {b: call(mod) for b, mod in builds.items()}
        first = next(iter(outs.values()))
        same = {b: bool(np.array_equal(o, first)) for b, o in outs.items()}
        times: dict[str, list[float]] = {b: [] for b in builds}
        for _ in range(args.rounds):
            for b, mod in builds.items():
                t = time.perf_counter()
                call(mod)
                times[b].append(time.perf_counter() - t)
        base = min(next(iter(times.values())))
        print(f"{name}:")
        for b, ts in times.items():
            ms = np.array(ts) * 1e3
            print(f"  {b}: min {ms.min():.3f} ms, p25 {np.percentile(ms, 25):.3f}, "
                  f"median {np.median(ms):.3f}; min / first's {ms.min() / 1e3 / base:.3f}; "
                  f"identical {same[b]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
