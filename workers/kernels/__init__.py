"""Pure tensor kernels: tensors in, tensors out, no I/O (the methods in workers/methods/ run them)."""
