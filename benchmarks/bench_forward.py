"""FP32 forward throughput: offq's NumPy/OpenBLAS forward vs transformers (torch CPU).

Protocol: the same model weights (the checkpoint dequantized to float32, loaded into both),
the same WikiText-2 test windows (first N windows of SEQLEN tokens, docs/METHODS.md section 7
windowing), the same thread count for both (offq: its one thread setting, which also limits
NumPy's OpenBLAS; torch: ``torch.set_num_threads``). Each timed call computes the per-token NLL
of one window (offq: ``Model.nll``; transformers: ``model(ids, labels=ids).loss`` with
``use_cache=False``), so both materialise the logits. Calls alternate offq / torch window by
window, after one untimed warm-up each; the reported figure is tokens/s over all timed calls,
and the ratio is offq time / torch time (target: <= 1.3).

    python benchmarks/bench_forward.py                 # smollm2-135m, 2 windows x 2048, 2 threads
    python benchmarks/bench_forward.py --quick         # 1 window x 256 (checks that it runs)
    python benchmarks/bench_forward.py --json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32,
                    help="also time incremental decoding of this many tokens (0: skip)")
    ap.add_argument("--quick", action="store_true", help="1 window of 256 tokens, 8 decode steps")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlen, args.windows, args.decode_tokens = 256, 1, 8

    import torch
    import transformers

    from offq.eval import make_windows
    from offq.formats import open_checkpoint
    from offq.kernels import set_num_threads
    from offq.model import Model

    set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    with open_checkpoint(args.model) as ckpt:
        tensors = {k: ckpt.tensors[k] for k in ckpt.tensors.keys()}
        config, tok, name = ckpt.config, ckpt.tokenizer, ckpt.name
    model = Model.from_tensors(config, tensors, resident=True, name=name)
    _ = model.layers
    cls = transformers.Qwen2ForCausalLM if config.architecture == "qwen2" else \
        transformers.LlamaForCausalLM
    conf_cls = transformers.Qwen2Config if config.architecture == "qwen2" else \
        transformers.LlamaConfig
    ref = cls(conf_cls(**config.to_hf())).float().eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    del tensors

    try:
        from offq.data import load_wikitext2_test
        stream = tok.encode(load_wikitext2_test()[: 12 * args.seqlen * args.windows])
        source = "wikitext2 test"
    except FileNotFoundError:
        stream = np.random.default_rng(0).integers(0, config.vocab_size, 10 * args.seqlen).tolist()
        source = "random ids (wikitext2 not found)"
    bos = config.bos_token_id if config.add_bos else None
    win = make_windows(stream, args.seqlen, bos_id=bos, max_windows=args.windows).ids

    def run_offq(ids: np.ndarray) -> float:
        return float(model.nll(ids[None]).mean())

    def run_torch(ids: np.ndarray) -> float:
        with torch.no_grad():
            t = torch.from_numpy(ids[None])
            return float(ref(t, labels=t, use_cache=False).loss)

    run_offq(win[0][:64]), run_torch(win[0][:64])  # warm-up
    t_offq = t_torch = 0.0
    nll_offq, nll_torch = [], []
    for ids in win:
        t = time.perf_counter()
        nll_offq.append(run_offq(ids))
        t_offq += time.perf_counter() - t
        t = time.perf_counter()
        nll_torch.append(run_torch(ids))
        t_torch += time.perf_counter() - t
    tokens = win.size

    res = {
        "model": name, "method": "fp32", "seqlen": args.seqlen, "windows": int(win.shape[0]),
        "tokens": int(tokens), "threads": args.threads, "data": source,
        "cpu": platform.processor() or platform.machine(),
        "offq_tok_s": tokens / t_offq, "torch_tok_s": tokens / t_torch,
        "prefill_time_ratio_offq_over_torch": t_offq / t_torch,
        "nll_offq": float(np.mean(nll_offq)), "nll_torch": float(np.mean(nll_torch)),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }

    if args.decode_tokens:
        prompt = win[0][:128][None]
        steps = win[0][128:128 + args.decode_tokens]
        cache = model.new_cache()
        model.forward(prompt, cache=cache)
        t = time.perf_counter()
        for s in steps:
            model.forward(np.array([[s]]), cache=cache)
        t_dec_offq = time.perf_counter() - t
        with torch.no_grad():
            out = ref(torch.from_numpy(prompt), use_cache=True)
            past = out.past_key_values
            t = time.perf_counter()
            for s in steps:
                out = ref(torch.tensor([[int(s)]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
            t_dec_torch = time.perf_counter() - t
        res.update(decode_tokens=len(steps), decode_context=int(prompt.shape[1]),
                   offq_decode_tok_s=len(steps) / t_dec_offq,
                   torch_decode_tok_s=len(steps) / t_dec_torch,
                   decode_time_ratio_offq_over_torch=t_dec_offq / t_dec_torch)

    if args.json:
        print(json.dumps(res))
    else:
        print(f"# FP32 forward, {res['model']}, {res['windows']} window(s) x {res['seqlen']} "
              f"tokens of {res['data']}, {args.threads} threads, torch {res['torch']} / "
              f"transformers {res['transformers']}")
        print(f"prefill  offq {res['offq_tok_s']:8.1f} tok/s   torch {res['torch_tok_s']:8.1f} tok/s"
              f"   time ratio offq/torch {res['prefill_time_ratio_offq_over_torch']:.2f}"
              f"   (nll {res['nll_offq']:.4f} vs {res['nll_torch']:.4f})")
        if args.decode_tokens:
            print(f"decode   offq {res['offq_decode_tok_s']:8.1f} tok/s   torch "
                  f"{res['torch_decode_tok_s']:8.1f} tok/s   time ratio offq/torch "
                  f"{res['decode_time_ratio_offq_over_torch']:.2f}   ({res['decode_tokens']} "
                  f"tokens after a {res['decode_context']}-token prompt)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
