"""How a W4A4KV4 checkpoint's perplexity splits between its 4-bit weights, its 4-bit activations
and its 4-bit KV cache: the same stored weights evaluated at other activation / KV widths.

A diagnosis, not a method (issue 10: how much of the gap to FP32 a rotation of the activations
can close at all). Rows, each the checkpoint's weights as stored:

  W4A16KV8  activations in float, KV at 8 bits  (the weights' own cost: keys centred by the
            checkpoint's per-head offset cannot be read back without a quantized K cache, so
            8 bits stands in for float)
  W4A16KV4  activations in float, the checkpoint's 4-bit KV cache
  W4A8KV8   every linear input at 8 bits
  W4A4KV8   every linear input at 4 bits (as the checkpoint), KV at 8
  W4A4KV4   the checkpoint as it is

and, with ``--fp MODEL`` (the float model the checkpoint came from), FP32 on the same windows.
Everything runs the float32 simulation (``mode="fake"``): linears with 4-bit inputs form their
products with the W4A4 kernel's arithmetic (``GroupProduct``), so the W4A4KV4 row gives the real
kernels' perplexity (34.829 against 34.83 on the Quick start checkpoint); linears with 8- or
16-bit inputs run sgemm on the dequantized weights. The checkpoint is read through a temporary directory of
links whose config.json carries each row's widths (as ``bench_site_sensitivity.py`` does).

    python benchmarks/bench_width_budget.py --ckpt runs/smollm2-offq --fp smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_site_sensitivity import linked_checkpoint  # noqa: E402

#: (row, activation bits, KV bits)
ROWS = (("W4A16KV8", 16, 8), ("W4A16KV4", 16, 4), ("W4A8KV8", 8, 8), ("W4A4KV8", 4, 8),
        ("W4A4KV4", 4, 4))


def main() -> int:
    import offq
    from offq.bench.machine import describe_machine
    from offq.data import load_wikitext2_test
    from offq.eval import load_model, perplexity

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="an offq W4A4KV4 checkpoint")
    p.add_argument("--fp", help="the float model it was quantized from (a name, HF dir or .gguf)")
    p.add_argument("--max-windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(r for r, _, _ in ROWS),
                   help="comma-separated subset of the rows (default: all)")
    args = p.parse_args()
    wanted = args.rows.split(",")
    if unknown := [r for r in wanted if r not in {r for r, _, _ in ROWS}]:
        p.error(f"--rows: unknown {unknown}; choose from {[r for r, _, _ in ROWS]}")
    offq.kernels.set_num_threads(args.threads)
    cfg = json.loads((args.ckpt / "config.json").read_text(encoding="utf-8"))["offq"]["quant_config"]
    if cfg.get("w_bits") != 4 or cfg.get("a_bits") != 4 or cfg.get("kv_bits") != 4:
        p.error(f"--ckpt: expected a W4A4KV4 checkpoint, got W{cfg.get('w_bits')}"
                f"A{cfg.get('a_bits')}KV{cfg.get('kv_bits')}")
    text = load_wikitext2_test()
    print(f"# {describe_machine()}; threads {args.threads}")
    print(f"# {args.ckpt} ({cfg['method']}, weights {cfg['w_quantizer']}, calibration "
          f"{cfg['calib_samples']} x {cfg['calib_seqlen']}): WikiText-2 test, first "
          f"{args.max_windows} windows x {args.seqlen}, no BOS unless the model adds one, "
          f"float32 simulation; the stored weights at every row")
    results = {}
    if args.fp:
        model, tok = load_model(args.fp)
        results["FP32"] = perplexity(model, tok, text, seqlen=args.seqlen,
                                     max_windows=args.max_windows, quiet=True)["ppl"]
        print(f"  FP32      ppl {results['FP32']:9.3f}", flush=True)
        del model
    with tempfile.TemporaryDirectory(prefix="offq-widths-") as tmp:
        for name, a_bits, kv_bits in (r for r in ROWS if r[0] in wanted):
            d = Path(tmp) / name
            d.mkdir()
            model, tok = load_model(str(linked_checkpoint(args.ckpt, d, a_bits=a_bits,
                                                          kv_bits=kv_bits)), mode="fake")
            t0 = time.perf_counter()
            results[name] = perplexity(model, tok, text, seqlen=args.seqlen,
                                       max_windows=args.max_windows, quiet=True)["ppl"]
            del model
            print(f"  {name:<9} ppl {results[name]:9.3f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    ref = results.get("FP32")
    base = results.get("W4A16KV8")
    print("| row | ppl |" + (" vs W4A16KV8 |" if base else "") + (" vs FP32 |" if ref else ""))
    print("|---|---|" + ("---|" if base else "") + ("---|" if ref else ""))
    for name, ppl in results.items():
        print(f"| {name} | {ppl:.3f} |" + (f" {ppl / base:.3f}x |" if base else "")
              + (f" {ppl / ref:.3f}x |" if ref else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
