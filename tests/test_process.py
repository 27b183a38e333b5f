"""offq.process.hold_freed_memory (what ``offq quantize --hold-freed-memory`` applies): freed
large arrays are reused from the heap instead of page-faulted in again. Each case runs in a fresh
interpreter, since the setting is process-wide."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

#: prepended to every child script: faults of ``cycles`` blocks of ``floats`` float32 (100 MB by
#: default) allocated, written and freed, after ``warmup`` more that may fault in either way
#: (they may grow the heap, or move glibc's adaptive mmap threshold)
CYCLE_FAULTS = """
import resource
import numpy as np

def cycle_faults(cycles=4, floats=25_000_000, warmup=1):
    for _ in range(warmup):
        a = np.ones(floats, np.float32); del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        a = np.ones(floats, np.float32)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""

FAULTS = """
import sys
if sys.argv[1] == "hold":
    from offq.process import hold_freed_memory
    assert hold_freed_memory()
print(cycle_faults(8))
"""


def run_child(script: str, arg: str, cwd: Path, timeout: int = 120) -> list[str]:
    """The words ``script`` (after CYCLE_FAULTS) prints in a fresh interpreter given ``arg``.
    cwd: not the checkout, since `-c` puts the cwd first on sys.path (the installed offq runs)."""
    out = subprocess.run([sys.executable, "-c", CYCLE_FAULTS + script, arg], capture_output=True,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def faults(mode: str, cwd: Path) -> int:
    return int(run_child(FAULTS, mode, cwd)[-1])


def test_freed_arrays_are_reused_without_page_faults(tmp_path: Path) -> None:
    """8 x 100 MB: glibc maps and unmaps each block (>= 25k faults of 4 KiB pages, or ~400 of
    2 MiB pages with transparent huge pages); held in the heap, the first block's pages serve
    all 8 (measured: 0 faults, against ~7,000 plain)."""
    held, plain = faults("hold", tmp_path), faults("plain", tmp_path)
    assert held * 5 < plain, (held, plain)


@pytest.mark.usefixtures("default_model_installed")
def test_quantize_flag_applies_it(tmp_path) -> None:
    """``offq quantize --hold-freed-memory`` takes the setting before any work (in a fresh
    process: RTN on the default model, then a 100 MB block freed and allocated again faults in
    nothing; without the flag it faults in ~25k pages, or ~50 huge ones)."""
    code = f"""
from offq.cli import main
rc = main(["quantize", "smollm2-135m", "--method", "rtn", "--threads", "1", "--quiet",
           "--out", {str(tmp_path / "q")!r}, "--hold-freed-memory"])
print(rc, cycle_faults(1))
"""
    rc, faulted = map(int, run_child(code, "", tmp_path, timeout=600)[-2:])
    assert rc == 0 and faulted < 20, (rc, faulted)


SCOPED = """
import sys
from offq.process import freed_memory_held, hold_freed_memory

if sys.argv[1] == "for-good":
    assert hold_freed_memory()
with freed_memory_held() as held:
    assert held
    with freed_memory_held():  # nested: the outer scope still holds on leaving
        pass
    inside = cycle_faults()
after = cycle_faults()
print(inside, after)
"""


def test_scoped_hold_reuses_inside_and_returns_on_leaving(tmp_path: Path) -> None:
    """Inside ``freed_memory_held`` (and after a nested scope ends) freed 100 MB blocks come back
    without faults; after the outermost scope glibc maps and unmaps them again (each cycle
    faults its pages in: ~25k small or ~50 huge), unless ``hold_freed_memory`` holds for good."""
    inside, after = map(int, run_child(SCOPED, "scoped", tmp_path))
    assert inside < 20 and after > 5 * max(inside, 10), (inside, after)
    inside, after = map(int, run_child(SCOPED, "for-good", tmp_path))
    assert inside < 20 and after < 20, (inside, after)


MID_SIZED = """
import sys
from offq.process import freed_memory_held

if sys.argv[1] == "scoped":
    with freed_memory_held():
        pass
print(cycle_faults(cycles=8, floats=1_000_000, warmup=2))  # 4 MB blocks
"""


def test_mid_sized_blocks_stay_in_the_heap_after_a_scoped_hold(tmp_path: Path) -> None:
    """After a scope ends, 4 MB temporaries (over glibc's initial 128 KiB mmap threshold, under
    the 32 MiB its adaptation reaches) come from the heap as in a process that never held:
    the mallopt calls switch the adaptation off, and leaving the threshold at 128 KiB made every
    such block be mapped and faulted in afresh (~1,000 faults a cycle, 45k per FP32 SmolLM2
    prefill after an in-process quantization)."""
    never = int(run_child(MID_SIZED, "never", tmp_path)[-1])
    after = int(run_child(MID_SIZED, "scoped", tmp_path)[-1])
    assert never < 50 and after < 50, (never, after)


QUANTIZE = """
import hashlib, sys
import offq
import offq.recipe.pipeline as pipeline
from offq.config import QuantConfig

inside = []
calibrate_layer = pipeline.calibrate_layer
def measured(*args, **kwargs):
    if not inside:
        inside.append(cycle_faults())
    return calibrate_layer(*args, **kwargs)
pipeline.calibrate_layer = measured

ckpt = offq.load("smollm2-135m")
rng = np.random.default_rng(0)
calib = rng.integers(0, ckpt.config.vocab_size, size=(2, 64))
res = offq.quantize(ckpt, QuantConfig(method="offq", calib_samples=2, calib_seqlen=64), calib,
                    batch_size=1, progress=False, hold_freed_memory=sys.argv[1] == "hold")
digest = hashlib.sha256()
for name in sorted(res.tensors):
    digest.update(name.encode()); digest.update(np.ascontiguousarray(res.tensors[name]).tobytes())
print(inside[0], cycle_faults(), digest.hexdigest())
"""


@pytest.mark.usefixtures("default_model_installed")
def test_quantize_holds_freed_memory_during_its_layer_loop(tmp_path: Path) -> None:
    """``offq.quantize`` holds freed memory by default while it calibrates (a 100 MB block
    freed and allocated again faults nothing in), not after it returns, and without the hold
    it faults them in throughout; the checkpoint's tensors are the same bytes either way (a
    kernel or recipe step that read uninitialised memory would tell them apart)."""
    runs = {}
    for mode in ("hold", "return"):
        inside, after, digest = run_child(QUANTIZE, mode, tmp_path, timeout=900)[-3:]
        runs[mode] = (int(inside), int(after), digest)
    (held_in, held_after, held_digest), (plain_in, plain_after, plain_digest) = \
        runs["hold"], runs["return"]
    assert held_in < 20, runs
    assert plain_in > 5 * max(held_in, 10) and held_after > 5 * max(held_in, 10), runs
    assert held_digest == plain_digest


@pytest.mark.usefixtures("default_model_installed")
@pytest.mark.parametrize("flag, held", [((), True), (("--return-freed-memory",), False)])
def test_quantize_command_passes_the_hold(tmp_path: Path, monkeypatch, flag, held) -> None:
    """``offq quantize`` holds freed memory during the quantization unless
    ``--return-freed-memory`` (the recipe is run for real, its argument recorded on the way)."""
    import offq.recipe.pipeline as pipeline
    from offq.cli import main

    seen = []
    run = pipeline.quantize

    def recording(*args, **kwargs):
        seen.append(kwargs["hold_freed_memory"])
        return run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize", recording)
    rc = main(["quantize", "smollm2-135m", "--method", "rtn", "--threads", "1", "--quiet",
               "--out", str(tmp_path / "q"), *flag])
    assert rc == 0 and seen == [held]
