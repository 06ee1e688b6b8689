"""The autograd formula of every custom op here, C++ or Triton: its backward is an op of its own.

Each op `<op>` has a backward op `<op>_backward` that takes the output gradients followed by some of the
forward's inputs, and returns the gradients of some inputs. `register_autograd` writes the glue once
(setup_context saves those inputs, backward calls the backward op and puts its results in the inputs'
places), so the C++ op and its Triton twin share one formula.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def register_autograd(
    op: str,
    backward_op: Callable,
    *,
    saved: Sequence[int],
    grads_of: Sequence[int],
    output_mask: bool = False,
    materialize_grads: bool = True,
    lib: torch.library.Library | None = None,
) -> None:
    """Registers the autograd formula of `op` ("namespace::name", a C++ or a Triton op).

    Args:
        backward_op: called as ``backward_op(*output_grads, *(inputs[i] for i in saved)[, mask])``; returns
            the gradients of ``inputs[i] for i in grads_of``, in that order.
        saved: which forward inputs the backward op takes, in order; tensors are kept with
            ``save_for_backward``, the other arguments as they are (lists copied).
        grads_of: the inputs whose gradients the backward op returns; every other input gets None.
        output_mask: pass ``mask = [needs_input_grad[i] for i in grads_of]`` as the last argument, and return
            None for an input that needs no gradient (the kernel did not compute it).
        materialize_grads: False leaves the gradients of outputs that did not reach the loss None, rather
            than zero tensors, so that the backward kernel can skip them.
        lib: the torch.library.Library that owns the registration (the tests' emulated CUDA ops pass theirs).
    """
    saved, grads_of = tuple(saved), tuple(grads_of)

    def setup_context(ctx, inputs, output):
        kept = [inputs[i] for i in saved]
        ctx.tensor_at = [isinstance(v, torch.Tensor) for v in kept]
        ctx.save_for_backward(*(v for v in kept if isinstance(v, torch.Tensor)))
        ctx.args = [list(v) if isinstance(v, list) else v for v in kept if not isinstance(v, torch.Tensor)]
        ctx.num_inputs = len(inputs)
        ctx.set_materialize_grads(materialize_grads)

    def backward(ctx, *grads):
        tensors, args = iter(ctx.saved_tensors), iter(ctx.args)
        kept = [next(tensors) if is_tensor else next(args) for is_tensor in ctx.tensor_at]
        mask = [bool(ctx.needs_input_grad[i]) for i in grads_of]
        results = backward_op(*grads, *kept, mask) if output_mask else backward_op(*grads, *kept)
        out = [None] * ctx.num_inputs
        for k, (i, g) in enumerate(zip(grads_of, results)):
            out[i] = g if mask[k] or not output_mask else None
        return tuple(out)

    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=lib)
