"""Model configuration shared by every loader, the forward pass and the quantizers.

`ModelConfig` is the one description of a decoder-only transformer that offq understands: a
Llama-family block (RMSNorm -> attention with RoPE and grouped-query heads -> RMSNorm -> SwiGLU MLP),
optionally with q/k/v biases (Qwen2). Loaders build it from a HuggingFace ``config.json``
(`ModelConfig.from_hf`) or from GGUF metadata (``offq.formats.gguf``); offq checkpoints write it
back with `ModelConfig.to_hf`.

Supported source architectures (HF ``model_type``):

* ``llama``  - Llama 2, Llama 3, 3.1, 3.2 (``rope_scaling`` type ``llama3``), SmolLM / SmolLM2.
* ``mistral`` - Mistral without sliding-window attention. A config whose ``sliding_window`` is set
  and smaller than ``max_position_embeddings`` is accepted, but ``max_position_embeddings`` is
  capped at the window: offq always runs full causal attention, which equals sliding-window
  attention exactly as long as a sequence is no longer than the window. Longer sequences are
  rejected by the forward pass through that cap instead of silently computing something else.
* ``qwen2``  - Qwen2 / Qwen2.5 (q/k/v biases). Qwen2's optional sliding window (``use_sliding_window``)
  is treated the same way.

Mistral is mapped onto ``architecture == "llama"``: the two blocks are identical without the window.

RoPE: ``rope_scaling`` is ``None`` (plain RoPE) or a dict normalised to contain ``"rope_type"``
(``"llama3"`` with ``factor``, ``low_freq_factor``, ``high_freq_factor``,
``original_max_position_embeddings``; or ``"linear"`` with ``factor``). Both the legacy keys
(``rope_theta`` / ``rope_scaling``) and transformers 5's ``rope_parameters`` are read.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .arch import ARCHITECTURES, architecture_of

logger = logging.getLogger(__name__)

#: HF ``model_type`` -> offq architecture (from the descriptions in offq.model.arch).
SUPPORTED_MODEL_TYPES: dict[str, str] = {t: a.name for a in ARCHITECTURES.values()
                                         for t in a.hf_model_types}
#: HF ``architectures`` class names accepted (the causal-LM heads of the supported model types).
SUPPORTED_HF_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
#: RoPE variants the forward pass implements.
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

#: Upper bounds on the sizes a config may declare, far above any released model (Llama 3.1 405B:
#: 126 layers, width 16384, FFN 53248; vocabularies up to ~256k), so a corrupt or hostile file
#: fails here instead of sizing an allocation.
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
               "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12,
               "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
               "max_position_embeddings": 1 << 24}


def _supported_list() -> str:
    return "Llama (Llama 2/3/3.1/3.2, SmolLM), Mistral (without sliding window), Qwen2/Qwen2.5 " \
           f"(HF model_type one of {sorted(SUPPORTED_MODEL_TYPES)})"


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (see the module docstring for the families).

    Attributes:
        architecture: ``"llama"`` or ``"qwen2"`` (q/k/v biases).
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: usual meanings.
        num_attention_heads, num_key_value_heads: query heads and KV heads (GQA when fewer).
        head_dim: per-head width (``hidden_size // num_attention_heads`` unless the source says).
        rms_norm_eps: epsilon inside RMSNorm.
        rope_theta: RoPE base frequency.
        rope_scaling: ``None`` or a dict with ``"rope_type"`` (``"llama3"``/``"linear"``) + params.
        max_position_embeddings: longest supported sequence (capped at a sliding window, if any).
        tie_word_embeddings: ``lm_head`` shares ``model.embed_tokens.weight`` (no lm_head tensor).
        attention_bias: Llama's HF ``attention_bias`` (q/k/v/o biases); always True for qwen2
            (q/k/v biases). Which linears carry a bias is ``Architecture.biased_linears``.
        mlp_bias: Llama's HF ``mlp_bias`` (gate/up/down biases).
        bos_token_id, eos_token_id: special token ids (``None`` when the model has none).
        add_bos: whether evaluation windows start with a BOS token (mirrors what the model's own
            tokenizer does when encoding with special tokens).
        raw: the source configuration (HF config.json dict, or the GGUF metadata key/values).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {sorted(ARCHITECTURES)}, "
                             f"got {self.architecture!r}")
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
            if value > limit:  # a corrupt file, not a model: refuse before sizing anything by it
                raise ValueError(f"{name}: {value} exceeds offq's limit {limit}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: RoPE needs an even head dimension, got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise ValueError(f"rms_norm_eps: expected a number in (0, 1), got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0
                and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta: expected a finite number > 0, got {self.rope_theta!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ValueError(f"{name}: {value} outside the vocabulary [0, {self.vocab_size})")
        _check_rope_scaling(self.rope_scaling)
        _check_rope_angles(self)

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_dim(self) -> int:
        """Output width of q_proj (``num_attention_heads * head_dim``)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Output width of k_proj and v_proj (``num_key_value_heads * head_dim``)."""
        return self.num_key_value_heads * self.head_dim

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the architecture implies (HF names) with its shape ``[out, in]``
        (``Architecture.tensor_shapes``). Loaders use it to check that a checkpoint is complete."""
        return architecture_of(self).tensor_shapes(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], *, add_bos: bool | None = None) -> "ModelConfig":
        """Build from a HuggingFace ``config.json`` dict.

        A config.json is untrusted input: a value of the wrong type (a list where a size belongs,
        a string for a flag, ...) is reported as a ValueError naming the problem, never a TypeError.

        Args:
            cfg: the parsed config.json.
            add_bos: whether eval windows start with BOS. ``None`` -> ``cfg["offq_add_bos"]`` when
                present (offq checkpoints), else ``False``; loaders that have the tokenizer pass
                what the tokenizer does.

        Raises:
            ValueError: unsupported architecture (named, with the supported list), unsupported
                activation / RoPE variant / MLP bias, or missing or inconsistent sizes.
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"config: expected a dict (parsed config.json), got {type(cfg).__name__}")
        try:
            return cls._from_hf(cfg, add_bos)
        except (TypeError, AttributeError, ArithmeticError) as e:
            raise ValueError(f"config.json: a value has the wrong type ({type(e).__name__}: {e})") from e

    @classmethod
    def _from_hf(cls, cfg: Mapping[str, Any], add_bos: bool | None) -> "ModelConfig":
        model_type = cfg.get("model_type")
        classes = cfg.get("architectures") or []
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"architectures: expected a list of class names, got {classes!r}")
        if model_type is None and classes:
            model_type = SUPPORTED_HF_CLASSES.get(classes[0])
            if model_type is None:
                raise ValueError(f"unsupported architecture {classes[0]!r}; supported: {_supported_list()}")
        if model_type not in SUPPORTED_MODEL_TYPES:
            named = model_type if model_type is not None else (classes[0] if classes else "<missing model_type>")
            raise ValueError(f"unsupported architecture {named!r}; supported: {_supported_list()}")
        for c in classes:
            if c not in SUPPORTED_HF_CLASSES:
                raise ValueError(f"unsupported architecture class {c!r} (model_type {model_type!r}); "
                                 f"offq runs causal LMs: {sorted(SUPPORTED_HF_CLASSES)}")
        arch = SUPPORTED_MODEL_TYPES[model_type]

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ValueError(f"config.json ({model_type}): missing required key {key!r}")
            return cfg[key]

        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act != "silu":
            raise ValueError(f"hidden_act: offq implements SwiGLU with 'silu', got {act!r}")
        if _as_int("pretraining_tp", cfg.get("pretraining_tp", 1) or 1) != 1:
            logger.info("pretraining_tp=%s ignored (it only changes torch's summation order)",
                        cfg.get("pretraining_tp"))

        hidden = _as_int("hidden_size", need("hidden_size"))
        heads = _as_int("num_attention_heads", need("num_attention_heads"))
        kv_heads = _as_int("num_key_value_heads", cfg.get("num_key_value_heads") or heads)
        if heads <= 0:
            raise ValueError(f"num_attention_heads: expected a positive integer, got {heads}")
        head_dim = cfg.get("head_dim")
        head_dim = _as_int("head_dim", head_dim) if head_dim else hidden // heads
        max_pos = _as_int("max_position_embeddings", cfg.get("max_position_embeddings") or 2048)

        rope_theta, rope_scaling = _read_rope(cfg)

        window = _sliding_window(cfg, model_type)
        if window is not None and window < max_pos:
            logger.warning("%s: sliding_window=%d < max_position_embeddings=%d; offq runs full "
                           "attention, identical up to %d tokens, so max_position_embeddings is "
                           "capped at %d", model_type, window, max_pos, window, window)
            max_pos = window

        if arch == "qwen2":
            attention_bias = True
        else:
            attention_bias = as_json_bool("attention_bias", cfg.get("attention_bias", False))

        if add_bos is None:
            add_bos = as_json_bool("offq_add_bos", cfg.get("offq_add_bos", False))

        return cls(
            architecture=arch,
            vocab_size=_as_int("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=_as_int("intermediate_size", need("intermediate_size")),
            num_hidden_layers=_as_int("num_hidden_layers", need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_as_float("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=as_json_bool("tie_word_embeddings",
                                         cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=(as_json_bool("mlp_bias", cfg.get("mlp_bias", False)) if arch == "llama"
                      else False),
            bos_token_id=_first_id(cfg.get("bos_token_id"), "bos_token_id"),
            eos_token_id=_first_id(cfg.get("eos_token_id"), "eos_token_id"),
            add_bos=as_json_bool("offq_add_bos", add_bos),
            raw=dict(cfg),
        )

    def to_hf(self) -> dict[str, Any]:
        """A HuggingFace ``config.json`` dict that transformers loads into the same model.

        Written with the legacy ``rope_theta`` / ``rope_scaling`` keys (read by transformers 4 and 5).
        Mistral sources are written as ``llama`` (identical block without the sliding window).
        The eval BOS choice travels as ``offq_add_bos``.
        """
        arch = architecture_of(self)
        model_type, cls_name = arch.hf_model_types[0], arch.hf_class
        out: dict[str, Any] = {
            "architectures": [cls_name],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
            "offq_add_bos": self.add_bos,
        }
        if model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        else:
            out["use_sliding_window"] = False
            out["sliding_window"] = None
        return out


# ---------------------------------------------------------------------- helpers
def _as_int(name: str, value: Any) -> int:
    """An integer-valued size from JSON (``576`` or ``576.0``; not ``true``, ``"576"``, ``576.5``,
    NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) or value != int(value):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def as_json_bool(name: str, value: Any) -> bool:
    """A JSON boolean (``true``/``false``, or 0/1); not the string ``"false"``, which Python's
    ``bool`` would read as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    """A number from JSON (not ``true`` or ``"1e-5"``); range checks are ModelConfig's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _first_id(value: Any, name: str = "token id") -> int | None:
    """Token id fields may be an int, a list of ints (Llama 3.1 eos) or null; anything else (a
    string, 1.7, true) is a ValueError naming the field."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    return _as_int(name, value)


def _read_rope(cfg: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, normalised rope_scaling) from legacy keys or transformers 5 ``rope_parameters``."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, Mapping):
        if theta is None:
            theta = params.get("rope_theta")
        if scaling is None:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    theta = _as_float("rope_theta", theta) if theta is not None else 10000.0
    return theta, _normalise_rope_scaling(scaling)


def _normalise_rope_scaling(scaling: Any) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"rope_scaling: expected a dict or null, got {scaling!r}")
    out = dict(scaling)
    rope_type = out.get("rope_type", out.get("type", "default"))
    out.pop("type", None)
    out["rope_type"] = rope_type
    if rope_type == "default":
        return None
    _check_rope_scaling(out)
    return out


def _check_rope_scaling(scaling: dict | None) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling: unsupported rope type {rope_type!r}; "
                         f"supported: {list(SUPPORTED_ROPE_TYPES)}")
    needed = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"),
              "linear": ("factor",), "default": ()}[rope_type]
    for key in needed:
        value = scaling.get(key)
        if value is None:
            raise ValueError(f"rope_scaling ({rope_type}): missing {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (0 < value < float("inf")):
            raise ValueError(f"rope_scaling ({rope_type}): {key!r} expected a finite number > 0, "
                             f"got {value!r}")
    if rope_type == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError(f"rope_scaling (llama3): low_freq_factor {scaling['low_freq_factor']!r} "
                         f"must be below high_freq_factor {scaling['high_freq_factor']!r}")


def _check_rope_angles(config: "ModelConfig") -> None:
    """The RoPE angles ``position * inv_freq`` (float32, as ``offq.model.ops`` forms them) must be
    finite for every position below ``max_position_embeddings``: a ``rope_theta`` far below 1 or
    a tiny ``rope_scaling`` factor, each finite and positive, overflowed them to Inf, and every
    forward pass then returned NaN without an error."""
    import numpy as np

    from .ops import rope_inv_freq

    with np.errstate(all="ignore"):
        inv = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        last = np.float32(config.max_position_embeddings - 1) * inv
    if not (np.all(np.isfinite(last)) and np.all(inv >= 0)):
        what = "rope_theta" if config.rope_scaling is None else "rope_theta / rope_scaling"
        raise ValueError(f"{what}: RoPE angles overflow float32 within max_position_embeddings "
                         f"{config.max_position_embeddings} (rope_theta {config.rope_theta!r}, "
                         f"rope_scaling {config.rope_scaling!r})")


def _sliding_window(cfg: Mapping[str, Any], model_type: str) -> int | None:
    """The attention window, or None when every layer attends to the full causal context."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    if model_type == "qwen2":
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            if "sliding_attention" not in layer_types:
                return None
        elif not cfg.get("use_sliding_window", False):
            return None
    window = _as_int("sliding_window", window)
    if window < 1:
        raise ValueError(f"sliding_window: expected a positive integer or null, got {window}")
    return window
