"""A conversation's turns with the KV cache kept (``offq.generate.Conversation``) against the same
turns prefilled from an empty cache each time (``offq.generate.chat``, what ``offq generate
--interactive`` did before 2026-12-08).

Each turn is run both ways, alternated, on the same messages (the conversation so far, as the
kept-cache side built it): time to the first reply token (the prompt's prefill, then one pick) and
the whole turn. Greedy decoding, so both sides should give the same reply; the table says where
they did not (a prompt prefilled in two pieces rounds differently from one, and a near-tie of two
logits may then flip).

Protocol (printed): model and runtime; ``--turns`` user messages of a fixed script (questions
about one topic, each building on the last); ``--max-new-tokens`` per reply; threads; machine.

    python benchmarks/bench_chat.py                                # SmolLM2-135M float32, ~1 min
    offq quantize smollm2-135m --method offq --lm-head-bits 8 --out runs/offq8
    python benchmarks/bench_chat.py --model runs/offq8              # the fused W4A4KV4 decoder
    python benchmarks/bench_chat.py --model qwen2.5-coder-1.5b --turns 6
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

SCRIPT = [
    "I am planning a week-long trip to Italy in spring. Which cities should I visit?",
    "How many days would you spend in Rome, and what should I see there?",
    "What is the best way to travel from Rome to Florence?",
    "Which museums in Florence need tickets booked in advance?",
    "Suggest a day trip from Florence that is not too crowded.",
    "What food should I try in Tuscany?",
    "How do I get from Florence to Venice, and how long does it take?",
    "Give me three tips for visiting Venice on a budget.",
    "Summarise the whole itinerary we discussed in a few lines.",
    "What should I pack for this trip?",
]


def timed_turn(run) -> tuple[float, float, str]:
    """``run(on_token)`` -> (seconds to the first piece of text, seconds in all, the reply)."""
    t0 = time.perf_counter()
    first: list[float] = []

    def on_token(piece: str) -> None:
        if not first:
            first.append(time.perf_counter())

    reply = run(on_token)
    end = time.perf_counter()
    return (first[0] if first else end) - t0, end - t0, reply


def main() -> int:
    from offq.bench.machine import describe_machine
    from offq.eval import load_model
    from offq.generate import Conversation, GenerationConfig, chat
    from offq.kernels import set_num_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="registered name, HF directory, .gguf or offq checkpoint")
    ap.add_argument("--mode", default="auto", help="offq checkpoints: real, fused or auto")
    ap.add_argument("--turns", type=int, default=8, choices=range(1, len(SCRIPT) + 1),
                    metavar=f"1..{len(SCRIPT)}")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here as well")
    args = ap.parse_args()
    set_num_threads(args.threads)

    model, tok = load_model(args.model, mode=args.mode)
    runtime = ("fused C decoder" if getattr(model, "fused_runner", None) is not None
               else "NumPy path")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    print(f"# {args.model} ({getattr(model, 'method', 'float32')}, {runtime}); {args.turns} "
          f"turns of the fixed script, greedy, up to {args.max_new_tokens} new tokens a reply; "
          f"{describe_machine()}, {args.threads} threads", flush=True)
    talk = Conversation(model, tok, cfg=cfg)
    chat(model, tok, [{"role": "user", "content": "Hello"}], cfg)  # warm-up (first calls)
    print("| turn | prompt tokens | cached | prefilled | first token, kept cache (s) | "
          "first token, empty cache (s) | ratio | turn, kept (s) | turn, empty (s) | "
          "same reply |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for i, message in enumerate(SCRIPT[:args.turns]):
        ttft_kept, total_kept, reply = timed_turn(lambda cb: talk.say(message, on_token=cb))
        asked = talk.messages[:-1]
        ttft_empty, total_empty, ref = timed_turn(lambda cb: chat(model, tok, asked, cfg,
                                                                  on_token=cb))
        row = dict(turn=i + 1, prompt_tokens=talk.last_reused + talk.last_prefilled,
                   cached=talk.last_reused, prefilled=talk.last_prefilled,
                   ttft_kept=ttft_kept, ttft_empty=ttft_empty, total_kept=total_kept,
                   total_empty=total_empty, same_reply=reply == ref)
        rows.append(row)
        print(f"| {row['turn']} | {row['prompt_tokens']} | {row['cached']} | "
              f"{row['prefilled']} | {ttft_kept:.3f} | {ttft_empty:.3f} | "
              f"{ttft_empty / ttft_kept:.2f}x | {total_kept:.2f} | {total_empty:.2f} | "
              f"{'yes' if row['same_reply'] else 'no'} |", flush=True)
    kept = sum(r["total_kept"] for r in rows)
    empty = sum(r["total_empty"] for r in rows)
    print(f"\nwhole conversation: {kept:.1f} s with the cache kept, {empty:.1f} s from an empty "
          f"cache each turn ({empty / kept:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, runtime=runtime, machine=describe_machine(),
                           threads=args.threads, max_new_tokens=args.max_new_tokens,
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
