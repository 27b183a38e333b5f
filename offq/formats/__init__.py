"""Checkpoint formats: HF safetensors directories, GGUF files, registered model names.

The entry point is `open_checkpoint`; see `offq.formats.registry` for the `Checkpoint` /
`TensorStore` contract.
"""
from .registry import MODEL_NAMES, Checkpoint, TensorStore, check_tensors, open_checkpoint
from .safetensors import SafetensorsFile, SafetensorsWriter, load_safetensors, write_safetensors

__all__ = ["open_checkpoint", "Checkpoint", "TensorStore", "check_tensors", "MODEL_NAMES",
           "SafetensorsFile", "SafetensorsWriter", "load_safetensors", "write_safetensors"]
