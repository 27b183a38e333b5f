"""Where the quantize loop puts finished pieces: memory, or an offq checkpoint directory.

With a directory, finished layers go to ``DIR/.offq-partial/`` as they complete
(``layer_0000.safetensors`` ..., ``rotations.safetensors`` + ``rotations.json``, ``state.json``);
``--resume`` continues from there when the run's fingerprint matches (the source model's weights
by a hash of their sizes, headers and 64 sampled blocks, the QuantConfig, the calibration
tokens, the batch size and offq's version). The final directory is assembled from the same
bytes, so an interrupted-then-resumed run writes the same checkpoint as an uninterrupted one.
Each stored file carries, in its safetensors
metadata, the run it belongs to (a hash of that fingerprint) and a SHA-256 of its tensors (and of
``rotations.json``): a resumed run refuses a layer or rotation file that another run wrote or that
was changed since, instead of mixing it into the checkpoint.

Finishing writes ``model.safetensors`` and the tokenizer first and ``config.json`` last: a
directory with a ``config.json`` is complete. Every file is written atomically (temporary name,
fsync, rename, directory fsync), and files a previous run left in the directory that this one
does not write (an old tokenizer, a stale spill file) are removed first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..config import QuantConfig
from ..formats.checkpoint import (CONFIG_FILE, MODEL_FILE, PARTIAL_DIR, check_layer_tensors,
                                  load_safetensors, offq_block, save_safetensors)
from ..formats.files import atomic_write_json, fsync_dir, read_json_object

logger = logging.getLogger(__name__)

__all__ = ["CheckpointStore", "calibration_record", "fingerprint"]

#: Files a checkpoint directory may hold besides the partial directory (tokenizer files included).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def calibration_record(calib: np.ndarray | None, source: str | None,
                       seed: int | None) -> dict[str, Any] | None:
    """What config.json says of the calibration used (None when the run needed none): its shape,
    source, seed and the SHA-256 of its int64 token ids."""
    if calib is None:
        return None
    tokens = np.ascontiguousarray(calib, dtype=np.int64)
    return {"samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]), "source": source,
            "seed": None if seed is None else int(seed),
            "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}


def fingerprint(ckpt: Any, cfg: QuantConfig, calibration: dict[str, Any] | None,
                batch_size: int) -> dict[str, Any]:
    """What must match for ``--resume`` to continue a run: source weights (names, shapes,
    dtypes and, where the checkpoint offers it, a hash of its files' headers), config,
    calibration (:func:`calibration_record`), batch size and offq's version."""
    from .. import __version__

    src = hashlib.sha256()
    store = ckpt.tensors
    for name in sorted(store.keys()):
        shape = store.shape(name) if hasattr(store, "shape") else np.shape(store[name])
        dtype = store.dtype(name) if hasattr(store, "dtype") else str(np.asarray(store[name]).dtype)
        src.update(f"{name}:{tuple(shape)}:{dtype};".encode())
    source_id = getattr(ckpt, "source_id", None)
    if callable(source_id):
        src.update(str(source_id()).encode())
    return {"model": getattr(ckpt, "name", ""), "quant_config": cfg.to_dict(),
            "model_config": ckpt.config.to_hf() if hasattr(ckpt.config, "to_hf") else None,
            "source_sha256": src.hexdigest(), "calibration": calibration,
            "batch_size": int(batch_size), "offq_version": __version__}


#: how to get past a spoiled file of an unfinished run
_RESUME_HINT = "rerun without --resume to start over"


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a.reshape(-1)).cast("B"))
    return h.hexdigest()


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class CheckpointStore:
    """Finished rotations and layers, in memory (``out_dir=None``) or on disk (module docstring)."""

    def __init__(self, out_dir: str | Path | None, resume: bool, run_fingerprint: dict[str, Any]):
        """With ``out_dir``, the caller holds the directory's lock (``DirectoryLock``) for the
        store's whole life: a second run there would discard this one's unfinished layers."""
        self.mem: dict[Any, Any] = {}
        self.dir = None if out_dir is None else Path(out_dir)
        if self.dir is None:
            if resume:
                raise ValueError("resume: needs an output directory")
            return
        self.partial = self.dir / PARTIAL_DIR
        if self.partial.is_symlink() or (self.partial.exists() and not self.partial.is_dir()):
            # offq removes this directory when it finishes (shutil.rmtree refuses a link, after
            # the checkpoint is written) and discards it when it starts over
            raise ValueError(f"{self.partial}: not a directory of its own (a link or a file); "
                             "offq keeps an unfinished run there: move it away")
        for name in (CONFIG_FILE, MODEL_FILE, *_TOKENIZER_FILES):  # the files finish() writes
            path = self.dir / name
            if path.exists() and not path.is_file():  # found only after the whole run
                raise ValueError(f"{path}: a directory (or another non-file) where offq writes "
                                 "the checkpoint's file; move it away")
        state = self.partial / "state.json"
        fp = json.loads(json.dumps(run_fingerprint))  # normalised as stored
        self.run_id = _json_digest(fp)  # stamped into every file this run stores
        if resume and state.is_file():
            for path in self.partial.iterdir():  # a run stores regular files only
                if path.is_symlink() or not path.is_file():
                    raise ValueError(f"resume: {path} is not a file this run stored (a "
                                     f"directory or a link); {_RESUME_HINT}")
            old = read_json_object(state, _RESUME_HINT)
            if old != fp:
                diff = sorted(k for k in set(fp) | set(old) if old.get(k) != fp.get(k))
                raise ValueError(f"resume: {self.partial} was started with a different "
                                 f"{', '.join(diff)}; rerun without --resume to start over")
            logger.info("resuming from %s", self.partial)
        else:
            if self.partial.exists():
                logger.warning("discarding the unfinished run in %s", self.partial)
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            fsync_dir(self.dir)
            atomic_write_json(state, fp)

    # ------------------------------------------------------------------ rotations
    def has_rotations(self) -> bool:
        if self.dir is None:
            return "rot" in self.mem
        return (self.partial / "rotations.json").is_file()

    def save_rotations(self, r1: np.ndarray | None, r2: np.ndarray | None,
                       meta: dict[str, Any]) -> None:
        if self.dir is None:
            self.mem["rot"] = (r1, r2, meta)
            return
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64)
                  for k, v in (("r1", r1), ("r2", r2)) if v is not None}
        save_safetensors(self.partial / "rotations.safetensors", arrays,
                         self._stamp(arrays, meta_sha256=_json_digest(meta)))
        atomic_write_json(self.partial / "rotations.json", meta)  # last: marks them complete

    def _stamp(self, tensors: dict[str, np.ndarray], **extra: str) -> dict[str, str]:
        """The safetensors metadata of a stored file: this run's id and the tensors' digest."""
        return {"offq_run": self.run_id, "tensors_sha256": tensors_digest(tensors), **extra}

    def _check_stamp(self, path: Path, tensors: dict[str, np.ndarray], stored: dict[str, str],
                     **extra: str) -> None:
        """ValueError unless ``path`` was stored by this run and is unchanged since."""
        if stored.get("offq_run") != self.run_id:
            raise ValueError(f"resume: {path} was not written by this run (another run's file, "
                             f"or one from before offq stamped them); {_RESUME_HINT}")
        if stored.get("tensors_sha256") != tensors_digest(tensors) or any(
                stored.get(k) != v for k, v in extra.items()):
            raise ValueError(f"resume: {path} changed since this run wrote it (its tensors or "
                             f"their description no longer match its digest); {_RESUME_HINT}")

    def load_rotations(self, mc: Any = None, cfg: QuantConfig | None = None
                       ) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any]]:
        """R1, R2 and their description; with ``mc`` and ``cfg``, a resumed run's file is
        checked against the rotations that config computes (`expected_rotations`)."""
        if self.dir is None:
            return self.mem["rot"]
        meta = read_json_object(self.partial / "rotations.json", _RESUME_HINT)
        path = self.partial / "rotations.safetensors"
        arrays, stored = load_safetensors(path)
        if mc is not None and cfg is not None:
            _check_rotations(arrays, expected_rotations(mc, cfg), path)
            self._check_stamp(path, arrays, stored, meta_sha256=_json_digest(meta))
        return (np.array(arrays["r1"]) if "r1" in arrays else None,
                np.array(arrays["r2"]) if "r2" in arrays else None, meta)

    # ------------------------------------------------------------------ layers
    def _layer_path(self, i: int) -> Path:
        return self.partial / f"layer_{i:04d}.safetensors"

    def save_layer(self, i: int, tensors: dict[str, np.ndarray]) -> None:
        if self.dir is None:
            self.mem[i] = tensors
        else:
            save_safetensors(self._layer_path(i), tensors, self._stamp(tensors))

    def load_layer(self, i: int, mc: Any = None,
                   cfg: QuantConfig | None = None) -> dict[str, np.ndarray] | None:
        """Layer ``i``'s stored tensors, or None; with ``mc`` and ``cfg``, a file of a resumed
        run is checked as a checkpoint's layer (`check_layer_tensors`: names, shapes, dtypes,
        finite scales) and against its stamp (written by this run, unchanged) before anything
        reads it."""
        if self.dir is None:
            return self.mem.get(i)
        path = self._layer_path(i)
        if not path.is_file():
            return None
        try:
            tensors, stored = load_safetensors(path)
            if mc is not None and cfg is not None:
                check_layer_tensors(tensors, mc, cfg, i, str(path))
                for name, a in tensors.items():  # norms, biases (a fresh run refuses NaN there)
                    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                        raise ValueError(f"{path}: tensor '{name}' contains NaN or Inf")
        except (OSError, ValueError) as e:
            raise ValueError(f"resume: {e}; {_RESUME_HINT}") from None
        if mc is not None and cfg is not None:
            self._check_stamp(path, tensors, stored)
        return tensors

    # ------------------------------------------------------------------ the checkpoint
    def finish(self, glob: dict[str, np.ndarray], mc: Any, cfg: QuantConfig,
               meta: dict[str, Any], tokenizer: Any, *, calibration: dict[str, Any] | None = None,
               reports: dict[str, Any] | None = None) -> dict[str, np.ndarray] | None:
        """All tensors (in memory) or the checkpoint directory: model.safetensors, tokenizer,
        then config.json last; the partial directory is removed."""
        tensors = dict(glob)
        for i in range(mc.num_hidden_layers):
            tensors.update(self.load_layer(i))
        if self.dir is None:
            return tensors
        self._remove_stale(keep_tokenizer=tokenizer is not None)
        write_checkpoint(self.dir, tensors, mc, cfg, meta, tokenizer, calibration=calibration,
                         reports=reports)
        shutil.rmtree(self.partial)
        fsync_dir(self.dir)
        return None

    def _remove_stale(self, *, keep_tokenizer: bool) -> None:
        """Drop what an earlier run left that this one will not overwrite: the old config.json
        first (the directory is then marked incomplete), spill and temporary files, and the
        tokenizer files when this run has no tokenizer."""
        stale = [self.dir / CONFIG_FILE]
        stale += [p for p in self.dir.iterdir()
                  if p.is_file() and p.name.startswith(".") and (".tmp-" in p.name
                                                                  or ".data-" in p.name)]
        if not keep_tokenizer:
            stale += [self.dir / n for n in _TOKENIZER_FILES]
        for p in stale:
            if p.exists():
                p.unlink()
        fsync_dir(self.dir)


def write_checkpoint(directory: str | Path, tensors: dict[str, np.ndarray], mc: Any,
                     cfg: QuantConfig, meta: dict[str, Any], tokenizer: Any, *,
                     calibration: dict[str, Any] | None = None,
                     reports: dict[str, Any] | None = None) -> None:
    """Write an offq checkpoint directory: model.safetensors, the tokenizer, config.json last
    (its ``offq`` block marks the directory complete); every file atomically. An earlier
    config.json is removed first, so a crash in between leaves a directory that does not claim
    to be a checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old = directory / CONFIG_FILE
    if old.exists():
        old.unlink()
        fsync_dir(directory)
    save_safetensors(directory / MODEL_FILE, tensors, {"format": "offq"})
    if tokenizer is not None:
        tokenizer.save(directory)
    hf = mc.to_hf()
    hf["offq"] = offq_block(cfg, mc, meta, calibration, reports)
    atomic_write_json(directory / CONFIG_FILE, hf)
    fsync_dir(directory)


def expected_rotations(mc: Any, cfg: QuantConfig) -> dict[str, tuple[int, ...]]:
    """The arrays ``rotations.safetensors`` holds for this model and config, with their shapes
    (``offq.recipe.pipeline.compute_rotations``): R1 ``[d, d]`` when the method rotates, R2
    ``[layers, kv_heads, head_dim, head_dim]`` when it also has an R2."""
    if not cfg.rotates:
        return {}
    d, hd = mc.hidden_size, mc.head_dim
    out = {"r1": (d, d)}
    if cfg.r2 != "none":
        out["r2"] = (mc.num_hidden_layers, mc.num_key_value_heads, hd, hd)
    return out


def _check_rotations(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                     path: Path) -> None:
    """ValueError naming ``path`` unless it holds exactly the ``expected`` float64 arrays, finite
    (a missing R1 would quantize the remaining layers unrotated beside rotated ones)."""
    if set(arrays) != set(expected):
        raise ValueError(f"resume: {path} holds {sorted(arrays)}, expected {sorted(expected)}; "
                         f"{_RESUME_HINT}")
    for name, shape in expected.items():
        a = arrays[name]
        if a.dtype != np.float64 or tuple(a.shape) != shape:
            raise ValueError(f"resume: {path}: {name!r} is {a.dtype} {list(a.shape)}, expected "
                             f"float64 {list(shape)}; {_RESUME_HINT}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"resume: {path}: {name!r} contains NaN or Inf; {_RESUME_HINT}")
