"""The offq checkpoint directory format: its files, its config block and its tensor list.

Layout of ``DIR/``::

    config.json          the source model's HF config (norms fused, embeddings untied) plus an
                         ``offq`` block: format_version, offq_version, the QuantConfig, the
                         rotations used and the online transforms the runtime must apply
    model.safetensors    packed codes (``*.qweight`` uint8), ``*.scales`` / ``*.zeros`` (float32),
                         biases, norms, rotated embeddings and lm_head (float32)
    tokenizer.json ...   the tokenizer (``Tokenizer.save``)

``config.json`` is written last: a directory with one is complete. While quantizing, finished
layers go to ``DIR/.offq-partial/`` (see ``offq.recipe.store``). Every file is written atomically
(``offq.formats.files``). Loading (and building the runnable model) is
``offq.quant.assemble.load_quantized``.

The ``.safetensors`` files are read and written by ``offq.formats.safetensors`` (the project's one
reader: the header is validated before any tensor byte is touched, see its docstring); the
quantized tensors are read raw, in their stored dtype (U8 codes, F32 scales, F64 rotations).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import OFF, QuantConfig
from ..model.arch import architecture_of
from . import safetensors as _st
from .files import read_json_object
from .safetensors import DTYPES, write_safetensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTIAL_DIR = ".offq-partial"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------------- files
def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write one checkpoint file atomically (``offq.formats.safetensors.write_safetensors``:
    aligned, gap-free, laid out by item size then name, so equal tensors give equal bytes)."""
    write_safetensors(path, tensors, metadata)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of one checkpoint file: read-only views into the memory-mapped file,
    in their stored dtype. Raises ValueError naming the file and the problem for anything
    malformed (``offq.formats.safetensors.read_header``)."""
    path = Path(path)
    if not path.is_file():  # say what is wrong with the checkpoint, not only errno's words
        what = "is not a file" if path.exists() else "is missing"
        raise FileNotFoundError(f"{path}: {what} ({path.parent} is incomplete: re-run the "
                                "command that wrote it)")
    return _st.load_safetensors(path, mmap=True)


# ---------------------------------------------------------------------------------- config
def offq_block(cfg: QuantConfig, model_config: Any, rotations: Mapping[str, Any],
               calibration: Mapping[str, Any] | None = None,
               reports: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``offq`` block of config.json: versions, the QuantConfig, the rotations, the
    calibration actually used (shape, source, seed, token hash; None when the method needs none),
    per-linear reports (OSAQ) and the online transforms the runtime must apply."""
    from .. import __version__

    return {"format_version": FORMAT_VERSION, "offq_version": __version__,
            "quant_config": cfg.to_dict(), "rotations": dict(rotations),
            "calibration": None if calibration is None else dict(calibration),
            "reports": dict(reports or {}),
            "online": online_transforms(cfg, model_config),
            "norms_fused": True}


def online_transforms(cfg: QuantConfig, model_config: Any) -> dict[str, int | None]:
    """The online transforms the runtime applies to weights rotated under ``cfg``: R3's head
    dimension and R4's size (None where absent), as the ``offq`` block stores them."""
    return {"r3_head_dim": model_config.head_dim if cfg.rotates and cfg.r3 else None,
            "r4_size": model_config.intermediate_size if cfg.rotates and cfg.r4 else None}


def read_config(path: str | os.PathLike) -> tuple[Any, QuantConfig, dict[str, Any]]:
    """(ModelConfig, QuantConfig, offq block) of an offq checkpoint directory, validated."""
    from ..model.config import ModelConfig

    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not an offq checkpoint directory")
    raw = read_json_object(cfg_path)
    if "offq" not in raw:
        raise ValueError(f"{cfg_path}: no 'offq' block; this is not an offq checkpoint "
                         "(quantize it with `offq quantize`)")
    block = raw["offq"]
    if not isinstance(block, dict):
        raise ValueError(f"{cfg_path}: its 'offq' block is {type(block).__name__}, not an "
                         "object; the file was edited or is corrupt")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: offq format_version {version!r} is not supported "
                         f"(this offq reads version {FORMAT_VERSION})")
    if not isinstance(block.get("quant_config"), dict):  # not the defaults: they may differ
        raise ValueError(f"{cfg_path}: its 'offq' block has no quant_config object; the file "
                         "was edited or is corrupt")
    try:
        qcfg = QuantConfig.from_dict(block["quant_config"])
        model_config = ModelConfig.from_hf({k: v for k, v in raw.items() if k != "offq"})
        if qcfg.kv_bits != OFF:  # a group that does not divide head_dim fails here, not later
            qcfg.kv_group(model_config.head_dim)
        expected_tensors(model_config, qcfg)  # so do weight groups that divide no linear's width
    except (ValueError, TypeError) as exc:  # the field's own message, with the file
        raise ValueError(f"{cfg_path}: {exc}") from None
    # the online transforms the weights were rotated for must be those the QuantConfig implies:
    # an edited method (say rtn -> quarot) would apply R3/R4 to weights never rotated
    implied = online_transforms(qcfg, model_config)
    if block.get("online") != implied:
        raise ValueError(f"{cfg_path}: its online transforms {block.get('online')!r} are not "
                         f"those its quant_config implies ({implied!r}); the file was edited or "
                         "is corrupt")
    return model_config, qcfg, block


def is_offq_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory whose config.json carries an ``offq`` key (a block that
    is not an object makes it a corrupt offq checkpoint, refused when read, not a float model)."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        return False
    try:  # past the size cap too: the reader of whatever this is names it
        return "offq" in read_json_object(cfg_path)
    except ValueError:
        return False


def expected_tensors(model_config: Any, cfg: QuantConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor an offq checkpoint of this model/config holds: name -> (shape, dtype)."""
    arch = architecture_of(model_config)
    linear_weights = {arch.weight(i, lin) for i in range(model_config.num_hidden_layers)
                      for lin in arch.linear_names}
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, shape in model_config.tensor_shapes().items():
        if name in linear_weights and cfg.w_bits != 16:
            n, k = shape
            g = cfg.weight_group(k)
            codes, scales, zeros = arch.quantized_names(name)
            out[codes] = ((n, (k + 1) // 2 if cfg.w_bits == 4 else k), "U8")
            out[scales] = ((n, k // g), "F32")
            out[zeros] = ((n, k // g), "F32")
        else:
            out[name] = (tuple(shape), "F32")
    if cfg.centres_keys:
        shape = (model_config.num_key_value_heads, model_config.head_dim)
        for i in range(model_config.num_hidden_layers):
            out[arch.key_offset(i)] = (shape, "F32")
    v, d = model_config.vocab_size, model_config.hidden_size
    if cfg.lm_head_bits in (4, 8):  # offq.quant.lm_head: codes + the grid of each group
        from ..quant.lm_head import lm_head_tensor_specs

        out.pop(arch.lm_head[0], None)
        out.update(lm_head_tensor_specs(arch.lm_head[0], cfg.lm_head_bits, v, d))
    else:
        out.setdefault(arch.lm_head[0], ((v, d), "F32"))
    return out


def check_checkpoint_tensors(tensors: Mapping[str, np.ndarray], model_config: Any,
                             cfg: QuantConfig, source: str, *, offq_grids: bool = True) -> None:
    """Every expected tensor present with its dtype and shape, no other tensor, every
    quantization scale finite (and >= 0) and every zero-point a whole number (2^(bits - 1) for
    symmetric weights), and every 2/3-bit code below 2^bits (ValueError naming the tensor
    otherwise). ``offq_grids`` False: weights of another tool (a GPTQ export), whose signs and
    symmetric zero-points are its own (a symmetric grid may carry the sign in its scale)."""
    _check_expected(tensors, expected_tensors(model_config, cfg), model_config, cfg, source,
                    offq_grids)


def check_layer_tensors(tensors: Mapping[str, np.ndarray], model_config: Any, cfg: QuantConfig,
                        i: int, source: str) -> None:
    """The checks of `check_checkpoint_tensors` on layer ``i``'s tensors alone: what a partial
    run stores a layer as (``offq.recipe.store``), read back by ``--resume`` (a spoiled file
    would otherwise be crossed by the calibration batch or copied into the checkpoint)."""
    arch = architecture_of(model_config)
    expected = {n: v for n, v in expected_tensors(model_config, cfg).items()
                if arch.layer_of(n) == i}
    _check_expected(tensors, expected, model_config, cfg, source)


def _check_expected(tensors: Mapping[str, np.ndarray],
                    expected: Mapping[str, tuple[tuple[int, ...], str]], model_config: Any,
                    cfg: QuantConfig, source: str, offq_grids: bool = True) -> None:
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(map(repr, unknown[:3]))}{more}: "
                         f"not part of a {model_config.architecture} model with "
                         f"{cfg.w_bits}-bit weights")
    from ..quant.lm_head import lm_head_names

    head = lm_head_names(architecture_of(model_config).lm_head[0])  # its own code width
    for name, (shape, dt) in expected.items():
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor {name!r} ({cfg.w_bits}-bit weights)")
        a = tensors[name]
        if tuple(a.shape) != shape or a.dtype != DTYPES[dt]:
            raise ValueError(f"{source}: tensor {name!r} is {a.dtype} {list(a.shape)}, expected "
                             f"{dt} {list(shape)}")
        if name.endswith((".scales", ".zeros", ".k_cache_offset")) and not np.all(np.isfinite(a)):
            raise ValueError(f"{source}: tensor {name!r} contains NaN or Inf")
        # grids a quantizer writes: scales >= 0 and whole zero-points (an asymmetric grid need
        # not hold 0, so a zero-point may lie outside [0, 2^bits - 1]); a negative scale or a
        # fractional zero-point ran as a silently different model
        if offq_grids and name.endswith(".scales") and a.size and float(a.min()) < 0:
            raise ValueError(f"{source}: tensor {name!r} holds a negative scale "
                             f"({float(a.min())!r}): not a quantization grid")
        if name.endswith(".zeros") and a.size:
            off = a != np.round(a)
            if off.any():
                raise ValueError(f"{source}: tensor {name!r} holds zero-point "
                                 f"{float(a[off].flat[0])!r}, not a whole number")
            mid = float(1 << (cfg.w_bits - 1))
            if offq_grids and cfg.w_symmetric and name not in head and not np.all(a == mid):
                raise ValueError(f"{source}: tensor {name!r} holds zero-point "
                                 f"{float(a[a != mid].flat[0])!r}; symmetric {cfg.w_bits}-bit "
                                 f"weights have {mid!r} everywhere")
        if name.endswith(".qweight") and cfg.w_bits in (2, 3) and name not in head and \
                a.size and int(a.max()) >= 1 << cfg.w_bits:  # one code a byte: each is a code
            raise ValueError(f"{source}: tensor {name!r} holds code {int(a.max())}, outside "
                             f"[0, {(1 << cfg.w_bits) - 1}] for {cfg.w_bits}-bit weights")
