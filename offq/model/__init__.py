"""Model side of offq: architectures as data (`arch`), config, the float32 NumPy operations
(`ops`) and decoder (`decoder`), KV cache, swappable linears, and the thread pool they share."""
from .arch import ARCHITECTURES, CAPTURE_SITES, FUSED_LINEARS, LINEAR_NAMES, Architecture, architecture_of
from .decoder import DecoderLayer, Model, load_decoder_layer
from .kv_cache import FakeQuantKVCodec, KVCache, KVCodec, LayerKVCache
from .linear import DenseLinear, Linear, SlicedLinear

__all__ = [
    "ARCHITECTURES", "Architecture", "CAPTURE_SITES", "DecoderLayer", "DenseLinear",
    "FUSED_LINEARS", "FakeQuantKVCodec", "KVCache", "KVCodec", "LINEAR_NAMES", "LayerKVCache",
    "Linear", "Model", "SlicedLinear", "architecture_of", "load_decoder_layer",
]
