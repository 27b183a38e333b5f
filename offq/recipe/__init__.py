"""The OffQ recipe: `pipeline` (fuse -> statistics -> rotations -> per layer: calibrate, write
-> save), `calibrate` (one layer site by site: capture, quantize, carry the batch on),
`statistics` (the top-1 PCA pass), `rotations` (norm fusion, R1..R4), `store` (partial results,
resume, the final directory)."""
