"""Hand-written GPU kernels (Triton, which ships with torch). Each has a PyTorch reference it is tested
against (on CPU through Triton's interpreter, TRITON_INTERPRET=1); nothing here is needed on CPU."""
