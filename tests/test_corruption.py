"""Spoiled model directories never crash offq: opening and running one either works or raises
ValueError (or OSError), never another exception, for the three directory formats offq reads
(an offq checkpoint, a HF checkpoint, a GPTQ export). GGUF files have their own random-corruption
test in test_formats_gguf.py.

Two kinds of damage, both deterministic:
- **JSON type confusion**: every value of config.json (nested ones included), one at a time,
  replaced by a value of each other JSON type or out of range (a list where a number belongs, a
  string where a boolean belongs, ...). A longer random campaign of this kind found a list
  ``group_size`` in a GPTQ export raising TypeError (fixed in offq/formats/gptq_export.py);
  this test finds it again in the code before the fix.
- **random bytes**: a few byte changes, bit flips, boundary integers, truncations, insertions and
  deletions anywhere in config.json, model.safetensors or tokenizer.json.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import offq
from offq.config import QuantConfig
from offq.formats.gptq_export import export_gptq
from offq.recipe import pipeline

from tiny_models import calibration, tiny_checkpoint, write_word_tokenizer

#: what config.json values are swapped for (each is wrong for most keys, right for a few)
CONFUSIONS = [None, True, -1, 0, 2 ** 40, 1.5, float("nan"), "x", [], [4], {}, {"a": 1}]
IDS = list(range(3, 40))  # token ids every tiny model has


#: the paths each kind of directory runs on (a float model has one)
MODES = {"offq": ("real", "fake"), "gptq_export": ("real", "fake"), "hf": ("real",)}


def _run(directory: Path, kind: str) -> None:
    """What a user does with a model directory: evaluate it on each path it has."""
    for mode in MODES[kind]:
        offq.perplexity(str(directory), IDS, seqlen=16, max_windows=1, mode=mode, quiet=True)


def _survives(directory: Path, kind: str) -> None:
    """``_run`` works or raises ValueError / OSError; anything else fails the test."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            _run(directory, kind)
        except (ValueError, OSError):
            pass


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One directory of each kind, from tiny random models (one layer: each load is fast)."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    ck = tiny_checkpoint(3, arch="qwen2", layers=1)
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(ck.config.to_hf()))
    write_word_tokenizer(hf, ck.config.vocab_size)
    from offq.formats.safetensors import SafetensorsWriter
    with SafetensorsWriter(hf / "model.safetensors") as w:
        for k, v in ck.tensors.items():
            w.add(k, v)
    out["hf"] = hf
    pipeline.quantize(ck, QuantConfig(method="offq"), calibration(ck), out_dir=root / "offq",
                      progress=False)
    out["offq"] = root / "offq"
    ck = tiny_checkpoint(5, layers=1)
    wo = root / "weight_only"
    pipeline.quantize(ck, QuantConfig(method="gptq", a_bits=16, kv_bits=16, w_bits=3,
                                      w_group_size=32, w_symmetric=False), calibration(ck),
                      out_dir=wo, progress=False)
    out["gptq_export"] = export_gptq(wo, root / "gptq_export")
    for kind, d in out.items():
        _run(d, kind)  # each source itself runs
    return out


def _json_slots(obj, path=()):
    """(path, value) of every value in a JSON document, nested ones included."""
    if isinstance(obj, dict):
        items = obj.items()
    else:
        items = enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from _json_slots(v, path + (k,))


def _with(doc, path, value):
    """A deep copy of ``doc`` with the value at ``path`` replaced."""
    doc = json.loads(json.dumps(doc))
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("kind", list(MODES))
def test_config_values_of_the_wrong_type_or_range_are_value_errors(sources, tmp_path, kind):
    src = sources[kind]
    doc = json.loads((src / "config.json").read_text())
    work = tmp_path / "work"
    shutil.copytree(src, work)
    tried = 0
    for path, old in _json_slots(doc):
        for value in CONFUSIONS:
            if type(value) is type(old) and value == old:
                continue
            (work / "config.json").write_text(json.dumps(_with(doc, path, value)))
            _survives(work, kind)
            tried += 1
    assert tried > 100, tried  # the document was walked


def _spoil_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = int(rng.integers(0, 6))
    if kind == 0:  # a few bytes set
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
    elif kind == 1:  # bit flips
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    elif kind == 2:  # a boundary integer of 1, 2, 4 or 8 bytes (lengths, offsets, counts)
        width = [1, 2, 4, 8][int(rng.integers(0, 4))]
        values = [0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]
        value = values[int(rng.integers(0, len(values)))]
        at = int(rng.integers(0, max(1, len(b) - width)))
        b[at:at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    elif kind == 3:  # truncated
        b = b[:int(rng.integers(0, len(b)))]
    elif kind == 4:  # bytes deleted (everything after shifts)
        at = int(rng.integers(0, len(b)))
        del b[at:at + int(rng.integers(1, 64))]
    else:  # bytes inserted
        at = int(rng.integers(0, len(b)))
        b[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8))
    return bytes(b)


@pytest.mark.parametrize("kind", list(MODES))
def test_random_byte_damage_never_crashes(sources, tmp_path, kind):
    src = sources[kind]
    files = sorted(p.name for p in src.iterdir() if p.is_file())
    rng = np.random.default_rng(11)
    work = tmp_path / "work"
    for _ in range(150):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        name = files[int(rng.integers(0, len(files)))]
        data = (work / name).read_bytes()
        (work / name).write_bytes(_spoil_bytes(data, rng))
        _survives(work, kind)
