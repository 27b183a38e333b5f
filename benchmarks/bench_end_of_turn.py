"""Does a quantized instruct model still end its turns? Short questions through the chat
template, greedy: how many replies end at the end-of-turn token within ``--max-new-tokens``, and
how many hold the expected word of the answer.

A float instruct model answers a short question and ends its turn; a W4A4KV4 one may keep
writing (its quantized logits rank a line end above the end-of-turn token), which a chat user
meets at once. Calibration on plain prose never shows the quantizer the role markers and
end-of-turn tokens of a chat; ``--calib-source wiki-vital-chat`` does. This script compares
checkpoints on the same questions; pass the float model too (a name) for its own rates.

Protocol (printed): 16 fixed one-line questions (below), each alone in a conversation with the
template's default system message; greedy; the reply's end-of-turn counted when it comes within
``--max-new-tokens``; "answer" = the expected word (case-insensitive) appears in the reply
(questions without one count as answered). Small and indicative: 16 questions.

    offq quantize smollm2-135m --method offq --calib-samples 16 --calib-seqlen 512 --out runs/w0
    offq quantize smollm2-135m --method offq --calib-samples 16 --calib-seqlen 512 \\
        --calib-source wiki-vital-chat --out runs/c0
    python benchmarks/bench_end_of_turn.py smollm2-135m runs/w0 runs/c0
"""
from __future__ import annotations

import argparse
import json
import sys

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

#: (question, a word the right answer contains; "" when any answer will do)
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("Name a primary colour.", ""),
    ("What is 2 + 2?", "4"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Translate 'good morning' into French.", "Bonjour"),
    ("How many legs does a spider have?", "eight"),
    ("What gas do plants absorb?", "carbon dioxide"),
    ("Give me a synonym for happy.", ""),
    ("What is the boiling point of water?", "100"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Which ocean is the largest?", "Pacific"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Who painted the Mona Lisa?", "Vinci"),
    ("How many days are in a week?", "seven"),
    ("What is the freezing point of water in Celsius?", "0"),
]


def main() -> int:
    from offq.bench.machine import describe_machine
    from offq.eval import load_model
    from offq.generate import GenerationConfig, chat
    from offq.kernels import set_num_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="names, HF directories, .gguf files or offq "
                                               "checkpoints (run on their fused C decoder)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here as well")
    args = ap.parse_args()
    set_num_threads(args.threads)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    print(f"# {len(QUESTIONS)} questions, greedy, up to {args.max_new_tokens} new tokens; "
          f"{describe_machine()}, {args.threads} threads", flush=True)
    print("| model | calibration | ended their turn | answer present | reply tokens |")
    print("|---|---|---|---|---|")
    rows = []
    for name in args.models:
        model, tok = load_model(name, mode="auto")
        calibration = getattr(model, "calibration", None) or _calibration(name)
        ended = answered = 0
        lengths = []
        for question, word in QUESTIONS:
            reply = chat(model, tok, [{"role": "user", "content": question}], cfg)
            n = len(tok.encode(reply))
            lengths.append(n)
            ended += n < args.max_new_tokens
            answered += word.lower() in reply.lower()
        rows.append(dict(model=name, method=getattr(model, "method", "fp32"),
                         calibration=calibration, ended=ended, answered=answered,
                         lengths=lengths))
        print(f"| {name} ({rows[-1]['method']}) | {calibration} | {ended}/{len(QUESTIONS)} | "
              f"{answered}/{len(QUESTIONS)} | {lengths} |", flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=describe_machine(), threads=args.threads,
                           max_new_tokens=args.max_new_tokens, rows=rows), f, indent=1)
    return 0


def _calibration(path: str) -> str:
    """An offq checkpoint's calibration (corpus, samples x seqlen, seed), else "-"."""
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        return "-"
    c = json.loads(config.read_text(encoding="utf-8")).get("offq", {}).get("calibration") or {}
    return f"{c.get('source')}, {c.get('samples')} x {c.get('seqlen')}, seed {c.get('seed')}"


if __name__ == "__main__":
    sys.exit(main())
