"""The quantized side of offq, one concern per module:

- `grid`: the uniform grid every quantizer uses (parameters, codes, packing through the C core);
- `weight`: `QuantizedWeight`, the one type of a quantized linear weight;
- `activation`: the run-time activation quantizer;
- `kv_codec`: the KV-cache codec and its packed store;
- `linears`: fake (simulated) and real (W4A4 kernel) quantized linears;
- `online`: the run-time halves of the rotations (R3 on Q/K, R4 before down_proj);
- `assemble`: decoder layers and models from quantized weights or an offq checkpoint.

Import the modules directly (``from offq.quant.weight import QuantizedWeight``); this package
imports nothing itself, so the low-level modules stay importable without the model side.
"""
