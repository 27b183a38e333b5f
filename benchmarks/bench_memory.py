"""Peak memory of streaming evaluation: a checkpoint larger than the memory cap still evaluates.

Protocol:
1. Write a synthetic random Llama checkpoint (HF layout: config.json, model.safetensors in
   float32, a small word-level tokenizer.json) whose float32 weights total MODEL_GB, with
   offq's own incremental safetensors writer; then drop the file from the page cache
   (posix_fadvise DONTNEED) so that reading it is charged to the evaluating process.
2. Evaluate it in a child process (``offq.eval.perplexity`` over random token windows; layers
   streamed: one decoder layer's weights resident at a time, embeddings + LM head resident)
   inside a memory cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``) capped at CAP_GB
   < MODEL_GB when the machine allows creating one; otherwise without a cap.
3. Report: model size, cap, the child's peak anonymous RSS (sampled every 5 ms from
   /proc/self/status RssAnon: memory the process itself allocated), its peak total RSS (VmHWM,
   which also counts clean file pages of the memory-mapped checkpoint; the kernel can drop
   those at any time), the cgroup's peak usage, and the expected bound
   ``one layer + embeddings + LM head`` for comparison.

    python benchmarks/bench_memory.py              # ~1.6 GB model, cap 1.0 GB
    python benchmarks/bench_memory.py --quick      # ~0.15 GB model, cap 0.12 GB (checks it runs)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

GB = 1e9


def synthetic_config(hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
                     vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32"}


def write_checkpoint(directory: Path, cfg: dict, seed: int = 0) -> int:
    """Write config.json, tokenizer.json and model.safetensors; returns the weights' bytes."""
    import tokenizers

    from offq.formats.files import atomic_write_json
    from offq.formats.safetensors import SafetensorsWriter
    from offq.model.config import ModelConfig

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "config.json", cfg)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(253)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    shapes = ModelConfig.from_hf(cfg).tensor_shapes()
    rng = np.random.default_rng(seed)
    total = 0
    with SafetensorsWriter(directory / "model.safetensors") as w:
        for name, shape in shapes.items():
            if len(shape) == 1:
                a = np.ones(shape, np.float32)
            else:
                a = rng.standard_normal(shape, dtype=np.float32)
                a *= np.float32(1.0 / math.sqrt(shape[1]))
            w.add(name, a)
            total += a.nbytes
            del a
    path = directory / "model.safetensors"
    with open(path, "rb") as f:  # evict the file from the page cache
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return total


# ------------------------------------------------------------------------------------------------
# child: evaluate and measure
# ------------------------------------------------------------------------------------------------
def child(directory: str, seqlen: int, windows: int, batch: int, threads: int) -> None:
    from offq.bench.memory import PeakMemory
    from offq.eval import perplexity
    from offq.formats import open_checkpoint
    from offq.kernels import set_num_threads
    from offq.model import Model

    set_num_threads(threads)
    t0 = time.perf_counter()
    with PeakMemory() as pm:
        with open_checkpoint(directory) as ckpt:
            model = Model.from_checkpoint(ckpt, resident=False)
            ids = np.random.default_rng(1).integers(3, 256, size=seqlen * windows).tolist()
            res = perplexity(model, None, ids, seqlen=seqlen, batch_size=batch, quiet=True)
    print(json.dumps({"ppl": res["ppl"], "windows": res["windows"], "seconds":
                      time.perf_counter() - t0, "peak_anon_bytes": pm.peak_anon,
                      "base_anon_bytes": pm.base_anon, "vm_hwm_bytes": pm.vm_hwm}))


# ------------------------------------------------------------------------------------------------
# parent: cgroup cap
# ------------------------------------------------------------------------------------------------
def make_cgroup(cap: int) -> tuple[Path | None, str]:
    """A fresh memory cgroup limited to ``cap`` bytes (v1, else v2); (None, why) when not allowed."""
    name = f"offq-bench-memory-{os.getpid()}"
    for root, limit, extra in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes",
                                "memory.memsw.limit_in_bytes"),
                               (Path("/sys/fs/cgroup/unified"), "memory.max", "memory.swap.max"),
                               (Path("/sys/fs/cgroup"), "memory.max", "memory.swap.max")):
        if not (root / "cgroup.procs").exists():
            continue
        cg = root / name
        try:
            cg.mkdir()
            (cg / limit).write_text(str(cap))
            if (cg / extra).exists():
                try:
                    (cg / extra).write_text(str(cap) if "memsw" in extra else "0")
                except OSError:
                    pass
            return cg, f"cgroup {cg} ({limit} = {cap})"
        except OSError as e:
            try:
                cg.rmdir()
            except OSError:
                pass
            why = f"cannot create a memory cgroup under {root}: {e}"
            continue
    return None, locals().get("why", "no memory cgroup hierarchy")


def cgroup_peak(cg: Path) -> int | None:
    for f in ("memory.max_usage_in_bytes", "memory.peak"):
        if (cg / f).exists():
            return int((cg / f).read_text().split()[0])
    return None


def cgroup_oom(cg: Path) -> bool:
    for f in ("memory.oom_control", "memory.events"):
        if (cg / f).exists():
            for line in (cg / f).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k in ("oom_kill", "oom") and int(v or 0) > 0:
                    return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--cap-gb", type=float, default=1.0, help="memory cap of the evaluating process")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--quick", action="store_true", help="~0.15 GB model, cap 0.12 GB")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.seqlen, args.windows, args.batch_size, args.threads)
        return 0
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 512, 1408, 12, 8, 2
        args.vocab, args.cap_gb, args.seqlen = 4096, 0.12, 128

    cfg = synthetic_config(args.hidden, args.intermediate, args.layers, args.heads,
                           args.kv_heads, args.vocab)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="offq-bench-memory-"))
    try:
        t = time.perf_counter()
        size = write_checkpoint(tmp, cfg)
        t_write = time.perf_counter() - t
        d, f, L, V = args.hidden, args.intermediate, args.layers, args.vocab
        hd = d // args.heads
        layer_bytes = 4 * (d * hd * (2 * args.heads + 2 * args.kv_heads) + 3 * d * f + 2 * d)
        embed_bytes = 4 * 2 * V * d  # embeddings + untied LM head

        cap = int(args.cap_gb * GB)
        cg, how = make_cgroup(cap)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tmp),
               "--seqlen", str(args.seqlen), "--windows", str(args.windows),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]

        def enter_cgroup() -> None:
            if cg is not None:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter_cgroup)
        peak_cg = cgroup_peak(cg) if cg is not None else None
        oom = cgroup_oom(cg) if cg is not None else False
        if cg is not None:
            try:
                cg.rmdir()
            except OSError:
                pass
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"child failed (rc {proc.returncode}{', OOM-killed under the cap' if oom else ''})",
                  file=sys.stderr)
            return 1
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        res = {"model_bytes": size, "layers": L, "hidden": d, "intermediate": f, "vocab": V,
               "cap_bytes": cap if cg is not None else None, "cap_mechanism": how,
               "one_layer_bytes": layer_bytes, "embeddings_and_head_bytes": embed_bytes,
               "peak_anon_rss_bytes": out["peak_anon_bytes"],
               "baseline_anon_rss_bytes": out["base_anon_bytes"],
               "peak_total_rss_bytes_vmhwm": out["vm_hwm_bytes"],
               "cgroup_peak_bytes": peak_cg, "seqlen": args.seqlen, "windows": out["windows"],
               "batch_size": args.batch_size, "eval_seconds": out["seconds"],
               "write_seconds": t_write, "ppl": out["ppl"]}
        if args.json:
            print(json.dumps(res))
        else:
            mb = 1e-6
            print(f"# streaming eval memory: synthetic Llama fp32, {L} layers, d={d}, ff={f}, "
                  f"vocab={V}; {res['windows']} windows x {args.seqlen} tokens, batch "
                  f"{args.batch_size}, {args.threads} threads")
            print(f"model weights          {size * mb:9.1f} MB")
            print(f"memory cap             {cap * mb:9.1f} MB   ({how})" if cg is not None
                  else f"memory cap             none ({how})")
            print(f"peak anon RSS          {res['peak_anon_rss_bytes'] * mb:9.1f} MB   "
                  f"(interpreter + libraries at start: {res['baseline_anon_rss_bytes'] * mb:.1f} MB)")
            print(f"peak total RSS (VmHWM) {res['peak_total_rss_bytes_vmhwm'] * mb:9.1f} MB   "
                  "(includes clean, droppable pages of the memory-mapped file)")
            if peak_cg is not None:
                print(f"cgroup peak usage      {peak_cg * mb:9.1f} MB   (includes page cache)")
            print(f"bound: one layer {layer_bytes * mb:.1f} MB + embeddings and LM head "
                  f"{embed_bytes * mb:.1f} MB = {(layer_bytes + embed_bytes) * mb:.1f} MB "
                  "(+ activations)")
        return 0
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
