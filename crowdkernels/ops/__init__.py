"""The library's custom ops: one module per op (argument checks, torch.library registration,
fake kernels, autograd) and `reference.py`, the plain-PyTorch oracles written from the papers' equations."""
