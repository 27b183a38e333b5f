"""Writing a checkpoint-sized safetensors file: straight from a mapping against the staged writer.

`offq.formats.safetensors.write_safetensors` writes a mapping (what `offq quantize` saves: every
tensor exists) header first, each array's bytes straight into the temporary file; an iterable of
pairs goes through `SafetensorsWriter`, which stages every byte in a spill file and copies it into
the final one. Both give the same bytes (tests/test_formats_safetensors.py). This times the two on
the same tensors, alternated in one process (which goes first swaps every round), each write
with its fsync and rename.

The default tensors have Qwen2.5-Coder-1.5B's sizes as `offq quantize` stores them: two float32
vocabulary matrices (151936 x 1536, the embeddings and the LM head) and 28 layers of 24 MiB of
packed codes, 2.57 GB in all. Written to `--dir` (default: a temporary folder under the current
one, so on the disk a checkpoint would go to), removed after each write.

    python benchmarks/bench_checkpoint_write.py [--rounds 4] [--vocab 151936] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.bench.machine import describe_machine  # noqa: E402
from offq.formats.safetensors import write_safetensors  # noqa: E402


def checkpoint_like(vocab: int, d: int, layers: int, layer_bytes: int) -> dict[str, np.ndarray]:
    """Tensors of a checkpoint's sizes: two float32 vocabulary matrices, one block of codes a
    layer (filled, so every page is touched before the timed writes)."""
    t = {"embed": np.full((vocab, d), 1.0, np.float32),
         "head": np.full((vocab, d), 2.0, np.float32)}
    for i in range(layers):
        t[f"layers.{i}.codes"] = np.full(layer_bytes, i, np.uint8)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--layer-mib", type=int, default=24)
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()
    tensors = checkpoint_like(args.vocab, args.hidden, args.layers, args.layer_mib << 20)
    gb = sum(a.nbytes for a in tensors.values()) / 1e9
    print(describe_machine(), flush=True)
    print(f"# {len(tensors)} tensors, {gb:.2f} GB; {args.rounds} alternated rounds; "
          f"folder {os.path.abspath(args.dir)}", flush=True)
    ways = {"staged (SafetensorsWriter)": lambda p: write_safetensors(p, iter(tensors.items())),
            "straight (mapping)": lambda p: write_safetensors(p, tensors)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.safetensors"
        for r in range(args.rounds):  # the first of a round meets the colder page cache
            for name, write in (list(ways.items()) if r % 2 == 0 else
                                list(ways.items())[::-1]):
                t = time.perf_counter()
                write(path)
                times[name].append(time.perf_counter() - t)
                path.unlink()
                print(f"{name:28s} {times[name][-1]:8.2f} s", flush=True)
    staged, straight = (min(v) for v in times.values())
    print(f"best: staged {staged:.2f} s, straight {straight:.2f} s ({staged / straight:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
