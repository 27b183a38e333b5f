"""Every supported architecture, described once, as data.

This module is the only place in offq that spells a tensor name. An :class:`Architecture` says
which tensors a model has (HF names and their llama.cpp/GGUF names), which linears read which
input site, which linears may share one product, where biases may sit and which activation the
MLP uses. The forward pass, the loaders, the rotations, the quantizers and the checkpoint code
ask it instead of formatting names themselves.

Adding a family whose math matches a Llama block is a short entry in `ARCHITECTURES`; one whose
math differs adds a field here and the code that reads it.

Layout conventions: a linear stores ``W [out, in]`` and computes ``y = x @ W.T (+ b)``. Dimension
keys (`LinearSpec.in_dim` / `out_dim`): ``hidden`` = d, ``q`` = heads * head_dim,
``kv`` = kv_heads * head_dim, ``ffn`` = intermediate size.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LinearSpec", "Architecture", "ARCHITECTURES", "LLAMA", "QWEN2", "architecture_of",
           "LINEAR_NAMES", "CAPTURE_SITES", "FUSED_LINEARS"]


@dataclass(frozen=True)
class LinearSpec:
    """One linear of a decoder layer.

    Attributes:
        name: offq's short name (``q_proj``), also the HF module's last component.
        module: the HF module path inside a layer (``self_attn.q_proj``).
        gguf: llama.cpp's tensor stem inside a block (``attn_q``).
        site: the capture site whose activation it reads (see `Architecture.sites`).
        in_dim, out_dim: dimension keys (module docstring).
        writes_residual: its output is added to the residual stream, so R1 acts on its output
            side (weight rows and bias); the others read the residual stream (R1 on the input side).
    """

    name: str
    module: str
    gguf: str
    site: str
    in_dim: str
    out_dim: str
    writes_residual: bool = False


#: The Llama block's linears in execution order (SmolLM2, Llama 2/3/3.x, Mistral, Qwen2 share them).
_LLAMA_LINEARS = (
    LinearSpec("q_proj", "self_attn.q_proj", "attn_q", "attn_in", "hidden", "q"),
    LinearSpec("k_proj", "self_attn.k_proj", "attn_k", "attn_in", "hidden", "kv"),
    LinearSpec("v_proj", "self_attn.v_proj", "attn_v", "attn_in", "hidden", "kv"),
    LinearSpec("o_proj", "self_attn.o_proj", "attn_output", "o_in", "q", "hidden", True),
    LinearSpec("gate_proj", "mlp.gate_proj", "ffn_gate", "mlp_in", "hidden", "ffn"),
    LinearSpec("up_proj", "mlp.up_proj", "ffn_up", "mlp_in", "hidden", "ffn"),
    LinearSpec("down_proj", "mlp.down_proj", "ffn_down", "down_in", "ffn", "hidden", True),
)


@dataclass(frozen=True)
class Architecture:
    """A decoder family as data (see the module docstring).

    Attributes:
        name: ``ModelConfig.architecture`` value.
        hf_model_types: HF ``model_type`` values read as this family.
        hf_class: the causal-LM class name written to config.json.
        gguf_arch: GGUF ``general.architecture``.
        linears: the layer's linears in execution order.
        norms: norm key -> (HF module inside a layer, GGUF stem); ``input_norm`` precedes
            attention, ``post_norm`` the MLP.
        site_norm: the capture sites that read a normalised residual, and which norm (norm
            fusion folds that norm's weight into every linear of the site).
        fused: linears that read one input and run as one product (outputs concatenated).
        biases_always: linears that always carry a bias (Qwen2's q/k/v).
        biases_optional: HF config flag -> linears that carry a bias when it is true.
        activation: the MLP's gate activation (``silu``: SwiGLU).
        gguf_permuted: linears whose rows llama.cpp's converter permuted for its RoPE layout
            (weight and bias), with the config field giving their head count.
        embed, final_norm, lm_head: (HF name, GGUF name) of the global tensors.
    """

    name: str
    hf_model_types: tuple[str, ...]
    hf_class: str
    gguf_arch: str
    linears: tuple[LinearSpec, ...] = _LLAMA_LINEARS
    norms: dict[str, tuple[str, str]] = field(default_factory=lambda: {
        "input_norm": ("input_layernorm", "attn_norm"),
        "post_norm": ("post_attention_layernorm", "ffn_norm")})
    site_norm: dict[str, str] = field(default_factory=lambda: {
        "attn_in": "input_norm", "mlp_in": "post_norm"})
    fused: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")})
    biases_always: tuple[str, ...] = ()
    biases_optional: dict[str, tuple[str, ...]] = field(default_factory=dict)
    activation: str = "silu"
    gguf_permuted: dict[str, str] = field(default_factory=dict)
    embed: tuple[str, str] = ("model.embed_tokens.weight", "token_embd.weight")
    final_norm: tuple[str, str] = ("model.norm.weight", "output_norm.weight")
    lm_head: tuple[str, str] = ("lm_head.weight", "output.weight")

    # ------------------------------------------------------------------ structure
    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.linears)

    @property
    def sites(self) -> dict[str, tuple[str, ...]]:
        """Capture site -> the linears reading it, in execution order."""
        out: dict[str, tuple[str, ...]] = {}
        for s in self.linears:
            out[s.site] = out.get(s.site, ()) + (s.name,)
        return out

    def spec(self, linear: str) -> LinearSpec:
        for s in self.linears:
            if s.name == linear:
                return s
        raise KeyError(f"linear: {linear!r} is not a linear of {self.name} "
                       f"(known: {list(self.linear_names)})")

    def biased_linears(self, flags: dict[str, Any]) -> tuple[str, ...]:
        """Linears with a bias for a config whose flags (``attention_bias`` ...) are ``flags``."""
        names = set(self.biases_always)
        for flag, lins in self.biases_optional.items():
            if flags.get(flag):
                names.update(lins)
        return tuple(n for n in self.linear_names if n in names)

    # ------------------------------------------------------------------ HF names
    @staticmethod
    def layer_prefix(i: int) -> str:
        return f"model.layers.{i}."

    def weight(self, i: int, linear: str) -> str:
        """HF name of layer ``i``'s linear weight."""
        return f"{self.layer_prefix(i)}{self.spec(linear).module}.weight"

    def bias(self, i: int, linear: str) -> str:
        return f"{self.layer_prefix(i)}{self.spec(linear).module}.bias"

    def norm(self, i: int, which: str) -> str:
        return f"{self.layer_prefix(i)}{self.norms[which][0]}.weight"

    def key_offset(self, i: int) -> str:
        """Stored name of layer ``i``'s key offset ``[kv_heads, head_dim]`` (an offq tensor: the
        mean key subtracted before the K cache is quantized, ``QuantConfig.kv_centre_keys``)."""
        return f"{self.layer_prefix(i)}self_attn.k_cache_offset"

    def layer_of(self, name: str) -> int | None:
        """The layer index of an HF tensor name (None for global tensors)."""
        m = re.match(r"^model\.layers\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def linear_of(self, name: str) -> tuple[str, str] | None:
        """(linear, "weight" | "bias") of an HF tensor name of a layer's linear, else None."""
        for s in self.linears:
            for kind in ("weight", "bias"):
                if name.endswith(f".{s.module}.{kind}") and self.layer_of(name) is not None:
                    return s.name, kind
        return None

    @staticmethod
    def quantized_names(weight_name: str) -> tuple[str, str, str]:
        """The stored names (codes, scales, zeros) of a quantized weight (a linear's, or the LM
        head's: offq.quant.lm_head)."""
        base = weight_name[: -len(".weight")]
        return base + ".qweight", base + ".scales", base + ".zeros"

    # ------------------------------------------------------------------ GGUF names
    @functools.cached_property
    def gguf_to_hf(self) -> dict[str, str]:
        """GGUF name pattern -> HF name pattern (``{i}`` for the layer) of every tensor."""
        out = {self.embed[1]: self.embed[0], self.final_norm[1]: self.final_norm[0],
               self.lm_head[1]: self.lm_head[0]}
        for key, (hf, gg) in self.norms.items():
            out[f"blk.{{i}}.{gg}.weight"] = f"model.layers.{{i}}.{hf}.weight"
        for s in self.linears:
            for kind in ("weight", "bias"):
                out[f"blk.{{i}}.{s.gguf}.{kind}"] = f"model.layers.{{i}}.{s.module}.{kind}"
        return out

    def hf_name(self, gguf_name: str) -> str | None:
        """HF name of a llama.cpp tensor name (None for tensors offq does not use)."""
        table = self.gguf_to_hf
        if gguf_name in table:
            return table[gguf_name]
        m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
        if m:
            hf = table.get("blk.{i}." + m.group(2))
            if hf is not None:
                return hf.replace("{i}", m.group(1))
        return None

    def gguf_name(self, hf_name: str) -> str | None:
        """Inverse of :meth:`hf_name`."""
        for gg, hf in self.gguf_to_hf.items():
            if "{i}" not in hf:
                if hf == hf_name:
                    return gg
                continue
            m = re.match("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$", hf_name)
            if m:
                return gg.replace("{i}", m.group(1))
        return None

    # ------------------------------------------------------------------ shapes
    def tensor_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Every tensor a model of ``config`` has (HF names) with its shape."""
        dims = dims_of(config)
        d, v = config.hidden_size, config.vocab_size
        shapes: dict[str, tuple[int, ...]] = {self.embed[0]: (v, d), self.final_norm[0]: (d,)}
        if not config.tie_word_embeddings:
            shapes[self.lm_head[0]] = (v, d)
        biased = set(self.biased_linears(config_flags(config)))
        for i in range(config.num_hidden_layers):
            for key in self.norms:
                shapes[self.norm(i, key)] = (d,)
            for s in self.linears:
                shapes[self.weight(i, s.name)] = (dims[s.out_dim], dims[s.in_dim])
                if s.name in biased:
                    shapes[self.bias(i, s.name)] = (dims[s.out_dim],)
        return shapes


def dims_of(config: Any) -> dict[str, int]:
    """Dimension key -> size for a ModelConfig."""
    return {"hidden": config.hidden_size, "q": config.q_dim, "kv": config.kv_dim,
            "ffn": config.intermediate_size}


def config_flags(config: Any) -> dict[str, Any]:
    """The bias flags of a ModelConfig."""
    return {"attention_bias": bool(getattr(config, "attention_bias", False)),
            "mlp_bias": bool(getattr(config, "mlp_bias", False))}


#: Llama 2/3/3.x, SmolLM/SmolLM2 and Mistral (without sliding window): HF's ``attention_bias``
#: puts a bias on q/k/v/o, ``mlp_bias`` on gate/up/down.
LLAMA = Architecture(
    name="llama", hf_model_types=("llama", "mistral"), hf_class="LlamaForCausalLM",
    gguf_arch="llama",
    gguf_permuted={"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"},
    biases_optional={"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                     "mlp_bias": ("gate_proj", "up_proj", "down_proj")})

#: Qwen2 / Qwen2.5: q/k/v always carry biases.
QWEN2 = Architecture(
    name="qwen2", hf_model_types=("qwen2",), hf_class="Qwen2ForCausalLM", gguf_arch="qwen2",
    biases_always=("q_proj", "k_proj", "v_proj"))

#: ``ModelConfig.architecture`` -> its description.
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, QWEN2)}


def architecture_of(config: Any) -> Architecture:
    """The :class:`Architecture` of a ModelConfig (or of an architecture name)."""
    name = config if isinstance(config, str) else config.architecture
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"architecture: {name!r} is not supported "
                         f"(supported: {sorted(ARCHITECTURES)})") from None


# The block structure every supported family shares (what the forward pass implements).
LINEAR_NAMES: tuple[str, ...] = LLAMA.linear_names
CAPTURE_SITES: dict[str, tuple[str, ...]] = LLAMA.sites
FUSED_LINEARS: dict[str, tuple[str, ...]] = LLAMA.fused
