"""The library's custom ops: one module per op (argument checks, the public function, fake kernels, autograd, in
that order), `_autograd.py` (the autograd glue the C++ and the Triton ops share) and `reference.py`, the
plain-PyTorch oracles written from the papers' equations. Which of them runs is `crowdkernels._ext.backend`'s
answer for the tensors' device."""
