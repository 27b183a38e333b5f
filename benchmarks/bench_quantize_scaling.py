"""Quantization time and memory against one FP32 forward pass (issue 10, "quantization that
scales").

Two child processes on the same calibration tokens (``--calib-samples`` x ``--calib-seqlen`` of
offq's default corpus, seed 0), one after the other:

1. ``forward``: one FP32 forward of the decoder layers over the calibration tokens, in batches of
   ``--batch-size`` sequences, layers streamed from the checkpoint as the recipe streams them
   (each layer read once, then every batch through it; the LM head is not applied: the recipe
   never computes logits);
2. ``quantize``: the whole ``offq.quantize`` of ``--method`` (writing the checkpoint to a
   temporary directory), with its time per stage. It holds freed memory from its rotations to
   its write, as ``offq quantize`` does by default (``offq.process.freed_memory_held``);
   ``--return-freed-memory`` runs it with glibc's usual malloc throughout.

``--hold-freed-memory`` makes both children hold freed memory from their start (the forward
too): the comparison with a forward spared its page faults as well.

With ``--bracket`` the forward runs again after the quantization and the ratio is taken against
the mean of the two forwards: on a shared or virtual machine whose speed drifts within the hour
(one run here saw the forward 12% and an unchanged stage 24% slower than a run hours before), the
two forwards show the drift and their mean cancels a steady one.

Printed: both wall times and their ratio (the issue's target: quantize <= 2.0x the forward), each
child's peak anonymous RSS (sampled) and VmHWM, and the memory budget the issue states: float32
embeddings + LM head + one decoder layer + the calibration hidden states + the Hessians of one
layer's input sites (float64).

    python benchmarks/bench_quantize_scaling.py                                   # SmolLM2-135M
    python benchmarks/bench_quantize_scaling.py --model qwen2.5-coder-1.5b --calib-samples 16
    python benchmarks/bench_quantize_scaling.py --model qwen2.5-coder-1.5b --keep runs/qwen-offq
    python benchmarks/bench_quantize_scaling.py --model qwen2.5-coder-1.5b --hold-freed-memory
    python benchmarks/bench_quantize_scaling.py --model qwen2.5-coder-1.5b --return-freed-memory
    python benchmarks/bench_quantize_scaling.py --model qwen2.5-coder-1.5b \
        --calib-activations quantized          # calibration on the real W4A4 kernels
    python benchmarks/bench_quantize_scaling.py --model qwen2.5-coder-1.5b --bracket
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

GB = 1e9


def calibration_ids(ckpt, samples: int, seqlen: int) -> np.ndarray:
    from offq.data import DEFAULT_CALIBRATION, sample_calibration

    return sample_calibration(ckpt.tokenizer, DEFAULT_CALIBRATION, n=samples, seqlen=seqlen,
                              seed=0, add_bos=bool(ckpt.config.add_bos))


def child(args: argparse.Namespace) -> None:
    """One stage in this process; prints one JSON line."""
    import offq
    from offq.bench.memory import PeakMemory
    from offq.config import QuantConfig
    from offq.kernels import set_num_threads
    from offq.model import Model

    set_num_threads(args.threads)
    if args.hold_freed_memory:  # before anything large is allocated, in both children alike
        from offq.process import hold_freed_memory
        if not hold_freed_memory():
            raise SystemExit("--hold-freed-memory: not applied (the C library is not glibc)")
    with PeakMemory() as pm:
        ckpt = offq.load(args.model)
        calib = calibration_ids(ckpt, args.calib_samples, args.calib_seqlen)
        t0 = time.perf_counter()
        out: dict = {}
        if args.stage == "forward":
            # layer by layer, as the recipe goes: each layer is read (and, from GGUF,
            # dequantized) once and carries every batch. (Before 2026-12-01 this ran
            # hidden_states per batch, which read every layer once per batch: 4 reads instead
            # of 1 at 16 x 2048, which made the forward slower and the ratio look better.)
            model = Model.from_checkpoint(ckpt, resident=False)
            h = model.embed(calib)
            for i in range(model.num_layers):
                layer = model.load_layer(i)
                for s in range(0, calib.shape[0], args.batch_size):
                    model.layer_forward(layer, h[s:s + args.batch_size])
                layer = None  # streaming: freed before the next layer is read
        else:
            cfg = QuantConfig(method=args.method, calib_samples=args.calib_samples,
                              calib_seqlen=args.calib_seqlen,
                              calib_activations=args.calib_activations,
                              pca_samples=QuantConfig.pca_samples if args.pca_samples is None
                              else args.pca_samples,
                              gptq_dtype=args.gptq_dtype)
            with tempfile.TemporaryDirectory() as tmp:
                res = offq.quantize(ckpt, cfg, calib,
                                    out_dir=Path(args.keep or Path(tmp) / "q"),
                                    batch_size=args.batch_size, progress=False,
                                    hold_freed_memory=not args.return_freed_memory)
            out["stages"] = res.timings
            out["config"] = cfg.describe(ckpt.config.hidden_size)
        out["seconds"] = time.perf_counter() - t0
    out.update(peak_anon=pm.peak_anon, base_anon=pm.base_anon, vm_hwm=pm.vm_hwm)
    print(json.dumps(out))


def budget(model: str, samples: int, seqlen: int) -> dict[str, float]:
    """The issue's memory budget, in bytes, from the model's shapes."""
    import offq
    from offq.model.arch import architecture_of

    ckpt = offq.load(model)
    mc = ckpt.config
    arch = architecture_of(mc)
    shapes = mc.tensor_shapes()
    layer = sum(int(np.prod(s)) * 4 for n, s in shapes.items() if arch.layer_of(n) == 0)
    d, f = mc.hidden_size, mc.intermediate_size
    hessians = 8.0 * (2 * d * d + (mc.num_attention_heads * mc.head_dim) ** 2 + f * f)
    return {"embeddings + LM head": 2 * mc.vocab_size * d * 4.0, "one layer": float(layer),
            "calibration hidden states": samples * seqlen * d * 4.0,
            "Hessians of one layer": hessians}


def main() -> int:
    from offq.config import CALIB_ACTIVATIONS, GPTQ_DTYPES, QuantConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="offq")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-activations", default=QuantConfig.calib_activations,
                    choices=CALIB_ACTIVATIONS,
                    help="QuantConfig.calib_activations (quantized, the default: the calibration "
                         "batch crosses the quantized layers on the real W4A4 kernels)")
    ap.add_argument("--pca-samples", type=int, default=None,
                    help="QuantConfig.pca_samples: sequences the statistics pass reads "
                         "(default: QuantConfig's)")
    ap.add_argument("--gptq-dtype", default=QuantConfig.gptq_dtype, choices=GPTQ_DTYPES,
                    help="QuantConfig.gptq_dtype (float32: GPTQ's factorization and updates "
                         "at twice the rate; auto, the default: float32 from 4096 inputs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="write the quantized checkpoint to DIR (kept: `offq eval DIR` scores "
                         "it) instead of a temporary directory")
    ap.add_argument("--hold-freed-memory", action="store_true",
                    help="both children keep freed memory (offq quantize --hold-freed-memory): "
                         "no page faults for reused temporaries, a higher peak")
    ap.add_argument("--return-freed-memory", action="store_true",
                    help="the quantization without its default hold of freed memory "
                         "(offq quantize --return-freed-memory)")
    ap.add_argument("--bracket", action="store_true",
                    help="run the forward again after the quantization and take the ratio "
                         "against the mean of the two forwards (cancels a steady drift of the "
                         "machine's speed)")
    ap.add_argument("--stage", choices=("forward", "quantize"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        child(args)
        return 0
    from offq.bench.machine import describe_machine

    print(f"# {args.model}, {args.method}, calibration {args.calib_samples} x "
          f"{args.calib_seqlen} (batch {args.batch_size}); {describe_machine()}, "
          f"{args.threads} threads"
          + (", freed memory held (both children)" if args.hold_freed_memory else
             ", freed memory returned (glibc's default)" if args.return_freed_memory else
             ", freed memory held by the quantization only (its default)"), flush=True)
    res: dict[str, dict] = {}
    stages = [("forward", "forward"), ("quantize", "quantize")]
    stages += [("forward", "forward 2")] if args.bracket else []
    for stage, label in stages:
        cmd = [sys.executable, __file__, "--stage", stage] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[label] = r = json.loads(out.strip().splitlines()[-1])
        print(f"{label:9s} {r['seconds']:8.1f} s   peak anon RSS {r['peak_anon'] / GB:6.2f} GB   "
              f"VmHWM {r['vm_hwm'] / GB:6.2f} GB", flush=True)
    q = res["quantize"]
    forwards = [res[k]["seconds"] for k in ("forward", "forward 2") if k in res]
    fwd = sum(forwards) / len(forwards)
    print(f"config: {q['config']}")
    print("quantize stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in q["stages"].items()))
    against = "the mean of the two forwards" if args.bracket else "the FP32 forward"
    print(f"quantize / FP32 forward = {q['seconds'] / fwd:.2f} (target <= 2.0; against {against}"
          + (f", {fwd:.1f} s; second / first forward {forwards[1] / forwards[0]:.3f}"
             if args.bracket else "") + ")")
    b = budget(args.model, args.calib_samples, args.calib_seqlen)
    print("budget: " + " + ".join(f"{k} {v / GB:.2f}" for k, v in b.items())
          + f" = {sum(b.values()) / GB:.2f} GB (quantize peak anon RSS "
          f"{q['peak_anon'] / GB:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
