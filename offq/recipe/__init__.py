"""The OffQ recipe: `pipeline` (fuse -> statistics -> rotations -> per layer: capture, quantize,
write, propagate -> save), `statistics` (the top-1 PCA pass), `rotations` (norm fusion, R1..R4),
`store` (partial results, resume, the final directory)."""
