"""Where the VAE encode and the attention-reading UNet forward run: torch (torch_backend,
with CUDA graphs in cuda_graphs) or ONNX Runtime (onnx_export writes the graphs,
onnx_backend runs them, onnx_format is the export folder's format both share)."""
