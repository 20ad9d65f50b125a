"""Every fact about CUDA kernels and the caching allocator, keyed by the GPU's compute capability."""
