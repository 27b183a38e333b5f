"""How many calibration sequences OffQ's top-1 PCA basis needs before it stops moving (issue 10).

One float statistics pass over ``--calib-samples`` x ``--calib-seqlen`` calibration tokens (offq's
default corpus, seed 0) keeps, at every residual-stream site (attention and MLP inputs of every
layer), each sequence's top-1 token (largest L-inf norm: what ``pca="top1"`` pools) and
``--probe-tokens`` random other tokens per sequence. From the first ``n`` sequences' top-1 tokens it
builds R1 = U1 P H1 exactly as ``offq.quantize`` does, for each ``n`` in ``--counts``, and prints:

* where the top-1 tokens sit (a statistics pass over the first L tokens of each sequence is
  exact when all of them sit before L: attention is causal);
* ``|cos|`` of the dominant direction against the all-sequences basis, and the overlap of the top-4
  and top-16 eigenspaces (1 = the same subspace);
* what R1 is for: the relative error ``||x - Q(x R1) R1^T|| / ||x||`` of 4-bit asymmetric per-group
  activation quantization (the runtime's quantizer, group = the R1 block), on the top-1 tokens of
  *every* sequence and on the random tokens, averaged over sites.

If the errors at ``n`` equal the all-sequences errors, the statistics pass can stop after ``n``
sequences (``QuantConfig.pca_samples``).

    python benchmarks/bench_pca_samples.py                                   # SmolLM2-135M
    python benchmarks/bench_pca_samples.py --model qwen2.5-coder-1.5b --calib-samples 16
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def collect(ckpt, calib: np.ndarray, batch_size: int, probe: int, seed: int):
    """(top-1 rows [sites, S, d], their positions [sites, S], probe rows [sites, S * probe, d])
    of the norm-fused float model."""
    from offq.model.arch import architecture_of
    from offq.model.decoder import LayerRunner, load_decoder_layer
    from offq.progress import track
    from offq.recipe.statistics import fused_layer

    mc = ckpt.config
    arch = architecture_of(mc)
    rng = np.random.default_rng(seed)
    runner = LayerRunner(mc)
    h = np.asarray(ckpt.tensors[arch.embed[0]], dtype=np.float32)[calib]
    top, rand, where = [], [], []
    for i in track(range(mc.num_hidden_layers), "statistics", unit="layer"):
        layer = load_decoder_layer(fused_layer(ckpt, mc, i), mc, i)
        per_site: dict[str, tuple[list, list, list]] = {}

        def capture(site: str, _i: int, x: np.ndarray) -> None:
            if site not in arch.site_norm:
                return
            t, r, pos = per_site.setdefault(site, ([], [], []))
            idx = np.abs(x).max(axis=-1).argmax(axis=1)
            t.append(x[np.arange(x.shape[0]), idx].astype(np.float64))
            pos.append(idx)
            for b in range(x.shape[0]):
                r.append(x[b, rng.choice(x.shape[1], probe, replace=False)].astype(np.float64))

        for s in range(0, h.shape[0], batch_size):
            runner.forward(layer, h[s:s + batch_size], capture=capture)
        for t, r, pos in per_site.values():
            top.append(np.concatenate(t))
            rand.append(np.concatenate(r))
            where.append(np.concatenate(pos))
    return np.stack(top), np.stack(where), np.stack(rand)


def r1_from(top: np.ndarray, n: int, d: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(R1, eigenbasis U1) from the first ``n`` sequences' top-1 rows of every site."""
    from offq.recipe import rotations as rot

    rows = top[:, :n].reshape(-1, d)
    cov = rows.T @ rows
    return rot.offq_r1(cov, d, group), rot.pca_basis(cov)[1]


def act_error(x: np.ndarray, r1: np.ndarray, group: int) -> float:
    """Mean over sites of ``||x - Q(x R1) R1^T||_F / ||x||_F`` (4-bit asymmetric, per group)."""
    from offq.kernels import dequantize, quantize

    errs = []
    for xs in x:
        y = np.ascontiguousarray(xs @ r1, dtype=np.float32)
        back = dequantize(quantize(y, bits=4, group_size=group, symmetric=False)) @ r1.T
        errs.append(np.linalg.norm(xs - back) / np.linalg.norm(xs))
    return float(np.mean(errs))


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """``||A_k^T B_k||_F^2 / k``: 1 when the top-k eigenspaces coincide."""
    return float(np.linalg.norm(a[:, :k].T @ b[:, :k]) ** 2 / k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--counts", default="1,2,4,8")
    p.add_argument("--probe-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import offq
    from offq.bench.machine import describe_machine
    from offq.config import QuantConfig
    from offq.data import DEFAULT_CALIBRATION, sample_calibration
    from offq.kernels import set_num_threads

    set_num_threads(args.threads)
    ckpt = offq.load(args.model)
    calib = sample_calibration(ckpt.tokenizer, DEFAULT_CALIBRATION, n=args.calib_samples,
                               seqlen=args.calib_seqlen, seed=0, add_bos=bool(ckpt.config.add_bos))
    d = ckpt.config.hidden_size
    group = QuantConfig(method="offq").activation_group(d)
    t0 = time.perf_counter()
    top, pos, rand = collect(ckpt, calib, args.batch_size, args.probe_tokens, seed=0)
    print(f"model {args.model}; calibration {DEFAULT_CALIBRATION} {args.calib_samples} x "
          f"{args.calib_seqlen}, seed 0; {top.shape[0]} sites; R1 block {group}; probes "
          f"{args.probe_tokens} random tokens per sequence per site; statistics pass "
          f"{time.perf_counter() - t0:.0f} s; {describe_machine()}, {args.threads} threads")
    # attention is causal: a prefix of a sequence has the same hidden states, so statistics from
    # the first L tokens of each sequence are exact wherever every top-1 token lies before L
    print(f"top-1 token positions over {pos.size} (site, sequence) pairs: "
          + ", ".join(f"{np.mean(pos < n):.3f} before {n}" for n in (1, 64, 512, 1024))
          + f"; latest {int(pos.max())}")
    full_r1, full_u = r1_from(top, args.calib_samples, d, group)
    print("| sequences | cos top-1 | top-4 overlap | top-16 overlap | act error top-1 tokens | "
          "act error random tokens |")
    print("|---|---|---|---|---|---|")
    counts = [int(c) for c in args.counts.split(",") if int(c) < args.calib_samples]
    for n in counts + [args.calib_samples]:
        r1, u = (full_r1, full_u) if n == args.calib_samples else r1_from(top, n, d, group)
        print(f"| {n} | {abs(u[:, 0] @ full_u[:, 0]):.6f} | {overlap(u, full_u, 4):.4f} | "
              f"{overlap(u, full_u, 16):.4f} | {act_error(top, r1, group):.5f} | "
              f"{act_error(rand, r1, group):.5f} |", flush=True)
    print(f"| identity R1 (no rotation) | | | | {act_error(top, np.eye(d), group):.5f} | "
          f"{act_error(rand, np.eye(d), group):.5f} |")


if __name__ == "__main__":
    main()
