"""Model side of offq: config, float32 NumPy forward pass, KV cache, swappable linears."""
from .kv_cache import FakeQuantKVCodec, KVCache, KVCodec, LayerKVCache
from .linear import ATTN_LINEARS, LINEAR_NAMES, MLP_LINEARS, DenseLinear, Linear
from .llama import CAPTURE_SITES, DecoderLayer, Model, load_decoder_layer

__all__ = [
    "ATTN_LINEARS", "CAPTURE_SITES", "DecoderLayer", "DenseLinear", "FakeQuantKVCodec", "KVCache",
    "KVCodec", "LINEAR_NAMES", "LayerKVCache", "Linear", "MLP_LINEARS", "Model",
    "load_decoder_layer",
]
