"""What storing the LM head in 8 or 4 bits (``--lm-head-bits 8`` / ``4``) costs in perplexity.

The same hidden states (one forward pass per window) go through every head: the checkpoint's
float32 head; its int8 codes with float32 activations (``x @ (scale * q).T`` in NumPy, what the
int8 kernel computed before it rounded activations to 16 bits); ``offq.kernels.matmul_i8`` as
offq runs it (activations rounded to 16 bits per group); and the 4-bit head offq stores
(``offq.quant.lm_head.quantize_lm_head4``: asymmetric, clip searched per group) as offq runs it,
packed through ``offq.kernels.matmul_wq`` with float32 activations. So the table separates the
weights' rounding from the activations'.

Protocol (printed): an offq checkpoint quantized *without* ``--lm-head-bits 8`` (its float head
is the reference); WikiText-2 test shipped with offq, the first ``--windows`` windows of
``--seqlen`` tokens (BOS as the model's config says); int8 symmetric codes, one scale per group
of ``g`` inputs (default: the group offq stores, the largest power of two dividing d, at most 128).

    offq quantize smollm2-135m --method offq --calib-samples 8 --calib-seqlen 512 --out runs/offq8
    python benchmarks/bench_lm_head_bits.py --ckpt runs/offq8               # ~2 min, 2 threads
    python benchmarks/bench_lm_head_bits.py --ckpt runs/offq8 --groups 64 32 16
    python benchmarks/bench_lm_head_bits.py --ckpt runs/offq8 --bits 4      # the 4-bit head only
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

CHUNK = 256  # rows of logits materialised at once (offq's NLL_CHUNK)


def window_nll(logits_fn, hn: np.ndarray, targets: np.ndarray) -> float:
    """Summed NLL of ``targets`` under the logits of ``hn[T, d]`` (row t predicts targets[t]),
    with ``token_nll``, the per-token NLL offq's perplexity uses."""
    from offq.model.ops import token_nll

    return sum(float(token_nll(logits_fn(hn[s:s + CHUNK]), targets[s:s + CHUNK]).sum())
               for s in range(0, len(targets), CHUNK))


def main() -> int:
    from offq.bench.machine import describe_machine
    from offq.data import load_wikitext2_test
    from offq.eval import load_model, make_windows
    from offq.kernels import set_num_threads
    from offq.kernels.matmul_i8 import matmul_i8, quantize_i8
    from offq.model.linear import DenseLinear
    from offq.model.ops import rms_norm
    from offq.quant.linears import PackedWeightLinear
    from offq.quant.lm_head import lm_head_group, quantize_lm_head4

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="offq checkpoint with a float32 LM head")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--groups", type=int, nargs="+", default=None,
                    help="int8 scale groups (default: the one offq stores)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[4, 8],
                    help="head widths to compare with the float32 head (default: 8 4)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_num_threads(args.threads)

    model, tok = load_model(args.ckpt, mode="real")
    if not isinstance(model.lm_head, DenseLinear):
        ap.error(f"--ckpt: {args.ckpt} stores its LM head as {type(model.lm_head).__name__}; "
                 "quantize it without --lm-head-bits so the float32 head is the reference")
    w = model.lm_head.weight
    d = w.shape[1]
    groups = args.groups or [lm_head_group(d)]
    bos = model.config.bos_token_id if getattr(model.config, "add_bos", False) else None
    win = make_windows(tok.encode(load_wikitext2_test(), add_bos=False), args.seqlen,
                       bos_id=bos, max_windows=args.windows)
    print(f"# {model.method}; LM head {w.shape[0]} x {d}; WikiText-2 test, {win.ids.shape[0]} "
          f"windows of {args.seqlen}; {describe_machine()}, {args.threads} threads", flush=True)

    heads = {"float32 head": lambda x: x @ w.T}
    for g in groups if 8 in args.bits else []:
        q, s = quantize_i8(w, g)
        w_hat = (q.reshape(q.shape[0], -1, g) * s[..., None]).reshape(q.shape)
        heads[f"int8 g{g}, float32 activations"] = lambda x, w_hat=w_hat: x @ w_hat.T
        heads[f"int8 g{g}, 16-bit activations (matmul_i8)"] = (
            lambda x, q=q, s=s, g=g: matmul_i8(np.ascontiguousarray(x), q, s, g))
    if 4 in args.bits:
        head4 = PackedWeightLinear(quantize_lm_head4(w))
        heads[f"4-bit asym g{head4.group}, float32 activations (matmul_wq)"] = head4
    nll = dict.fromkeys(heads, 0.0)
    count = 0
    t0 = time.perf_counter()
    for ids in win.ids:
        h = model.hidden_states(ids[None])[0]
        hn = np.ascontiguousarray(rms_norm(h, model.final_norm, float(model.config.rms_norm_eps)))
        for name, fn in heads.items():
            nll[name] += window_nll(fn, hn[:-1], ids[1:])
        count += len(ids) - 1
    print(f"{'head':52s} {'perplexity':>12s}   ({time.perf_counter() - t0:.0f} s)")
    for name, total in nll.items():
        print(f"{name:52s} {np.exp(total / count):12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
