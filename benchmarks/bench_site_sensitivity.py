"""Where a W4A4KV4 checkpoint loses its perplexity: one linear input site at a time in 4 bits.

A diagnosis, not a method: the checkpoint's weights are kept (4-bit), every linear input is
quantized to ``--base-bits`` (8) except the site under test, which runs at 4 bits, and the KV
cache stays at the checkpoint's width. Sites: ``qkv`` (the attention input), ``o_proj`` (the
attention output), ``gate_up`` (the MLP input), ``down_proj`` (the SwiGLU output after R4). Rows
``all`` (every site at 4 bits) and ``kv-base`` (every site at 4 bits, KV at the base width) bound
them. It also prints, per site, the median relative error ``||x - q(x)|| / ||x||`` of a token's
4-bit input and the median and largest peak-to-RMS ratio of a token (3.2 for a flat Gaussian of
576 entries; a massive outlier shows as tens or hundreds), on the first window.

Everything runs on the float32 simulation (``mode="fake"``: the activations are rounded and
dequantized, the products are sgemm on the dequantized weights), so the ``all`` row is close to,
not the same as, the real kernels' perplexity. The checkpoint is read through a temporary
directory of links whose config.json carries the base width.

    python benchmarks/bench_site_sensitivity.py --ckpt runs/smollm2-offq            # ~6 min
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

SITES = {"qkv": ("qkv", "q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
         "gate_up": ("gate_up", "gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def linked_checkpoint(ckpt: Path, into: Path, **bits: int) -> Path:
    """``into``: links to every file of ``ckpt`` but config.json, whose quant_config takes
    ``bits`` (a_bits, kv_bits)."""
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (into / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    cfg["offq"]["quant_config"].update(bits)
    (into / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return into


class _Recording:
    """An activation quantizer that also records each token's relative error and peak/RMS."""

    def __init__(self, act, log: list) -> None:
        self.act, self.log = act, log

    def fake(self, x: np.ndarray) -> np.ndarray:
        y = self.act.fake(x)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1])
        norm = np.maximum(np.linalg.norm(x2, axis=1), 1e-30)
        self.log.append((np.linalg.norm(x2 - y2, axis=1) / norm,
                         np.abs(x2).max(axis=1) / (norm / np.sqrt(x2.shape[1]))))
        return y

    def __getattr__(self, name: str):
        return getattr(self.act, name)


def with_site_at(model, names: tuple[str, ...], bits: int, log: list | None = None) -> int:
    """Set the activation width of every linear whose name is in ``names`` (fused or not);
    returns how many were set."""
    count = 0
    for layer in model.layers:
        for table in (getattr(layer, "fused", {}), layer.linears):
            for key, lin in table.items():
                if key in names and getattr(lin, "act", None) is not None:
                    act = dataclasses.replace(lin.act, bits=bits)
                    lin.act = act if log is None else _Recording(act, log)
                    count += 1
    return count


def main() -> int:
    import offq
    from offq.bench.machine import describe_machine
    from offq.data import load_wikitext2_test
    from offq.eval import load_model, make_windows, perplexity

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="an offq W4A4KV4 checkpoint")
    p.add_argument("--base-bits", type=int, default=8, help="every other site's width")
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    offq.kernels.set_num_threads(args.threads)
    cfg = json.loads((args.ckpt / "config.json").read_text(encoding="utf-8"))["offq"]["quant_config"]
    if cfg.get("a_bits") != 4:
        p.error(f"--ckpt: expected a checkpoint with 4-bit activations, got a_bits={cfg.get('a_bits')}")
    text = load_wikitext2_test()
    print(f"# {describe_machine()}; threads {args.threads}")
    print(f"# {args.ckpt}: WikiText-2 test, first {args.max_windows} windows x {args.seqlen}, "
          f"float32 simulation; weights as stored, KV {cfg['kv_bits']} bits unless the row says "
          f"otherwise, every linear input at {args.base_bits} bits except the row's")
    rows = [("base", (), cfg["kv_bits"])] + [(s, n, cfg["kv_bits"]) for s, n in SITES.items()]
    rows += [("all", sum(SITES.values(), ()), cfg["kv_bits"]),
             ("kv-base", sum(SITES.values(), ()), args.base_bits)]
    results, stats = {}, {}
    with tempfile.TemporaryDirectory(prefix="offq-sites-") as tmp:
        for name, names, kv in rows:
            d = Path(tmp) / name
            d.mkdir()
            model, tok = load_model(str(linked_checkpoint(args.ckpt, d, a_bits=args.base_bits,
                                                          kv_bits=kv)), mode="fake")
            if name in SITES:  # one window with the recording quantizer: the error statistics
                log: list = []
                with_site_at(model, names, 4, log)
                win = make_windows(tok.encode(text, add_bos=False), args.seqlen, max_windows=1)
                model.hidden_states(win.ids[:1], cache=model.new_cache())
                err = np.concatenate([e for e, _ in log])
                peak = np.concatenate([q for _, q in log])
                stats[name] = (float(np.median(err)), float(np.median(peak)), float(peak.max()))
                model, tok = load_model(str(d), mode="fake")
            count = with_site_at(model, names, 4)
            t0 = time.perf_counter()
            r = perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.max_windows,
                           quiet=True)
            results[name] = r["ppl"]
            print(f"  {name:<10} {count:4d} linears at A4  ppl {r['ppl']:9.3f}  "
                  f"x{r['ppl'] / results['base']:.3f} of base  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    print("| site at A4 | ppl | vs base | median token error | median / max peak-to-RMS |")
    print("|---|---|---|---|---|")
    for name, _, _ in rows:
        s = stats.get(name)
        extra = f"{s[0]:.3f} | {s[1]:.1f} / {s[2]:.1f}" if s else " | "
        print(f"| {name} | {results[name]:.3f} | {results[name] / results['base']:.3f}x | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
