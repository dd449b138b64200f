"""Matrix optimizers: Muon, Adafactor and SOAP, each a chain of blocks from `optcraft.blocks.matrix`,
and `muon_with_adamw`, the routed optimizer Muon is used as (hidden matrices on Muon, the rest on
AdamW).

Every recipe takes torch's names (`momentum`, `betas`, `weight_decay`) as well as fastai's
(`mom`, `sqr_mom`, `wd`), `impl` (see `optcraft.engine`) and `master_weights` (see
`optcraft.precision`).  See docs/modern-matrix.md.
"""
from __future__ import annotations

from functools import partial

import torch

from ..blocks import average_grad, step_stat, weight_decay
from ..blocks.matrix import (NS_COEFFICIENTS, adafactor_param_scale, adafactor_step,
                             adafactor_update, averaged_adafactor_step, factored_sqr_avg,
                             muon_step, soap_step)
from ..hypers import torch_names
from ..optimizer import Optimizer
from ..routing import part, route
from .classic import Adam

#: The named optimizers (the registry lists every function here that takes an `lr`).
__all__ = ["Muon", "Adafactor", "SOAP"]
#: Routing recipes: one optimizer running two chains, so not one named optimizer of the registry
#: (whose entries are one chain each); import them by name.
ROUTING = ["muon_with_adamw", "hidden_matrices"]


@torch_names
def Muon(params, lr=1e-3, wd=0.1, mom=0.95, nesterov=True, ns_coefficients=NS_COEFFICIENTS,
         eps=1e-7, ns_steps=5, adjust_lr_fn=None, flatten=False, impl="auto",
         master_weights=True):
    """Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"), as
    torch.optim.Muon computes it, with its names and defaults: `p <- p (1 - lr wd)`,
    `grad_avg <- lerp(grad_avg, g, 1 - mom)`, `u = lerp(g, grad_avg, mom)` (`nesterov=True`) or
    `grad_avg`, `p <- p - lr * s * NS(u)`, NS five quintic Newton-Schulz steps in bfloat16
    (batched over same-shaped matrices), `s = sqrt(max(1, rows / cols))` (`adjust_lr_fn=
    "match_rms_adamw"`: `0.2 sqrt(max(rows, cols))`, Moonlight's).

    Matrices only (a vector raises at the step): `flatten=True` runs a tensor of 3+ dimensions
    (a convolution's weight) as `(shape[0], -1)`.  For a whole model use `muon_with_adamw`."""
    cbs = [weight_decay, partial(average_grad, dampening=True),
           partial(muon_step, flatten=True) if flatten else muon_step]
    # A tuple would be read as one value per parameter group: wrapped, every group gets it.
    return Optimizer(params, cbs, lr=lr, wd=wd, mom=mom, nesterov=nesterov,
                     ns_coefficients=[tuple(ns_coefficients)], eps=eps, ns_steps=ns_steps,
                     adjust_lr_fn=adjust_lr_fn, impl=impl, master_weights=master_weights)


#: The registry and the command line give Muon the matrices of a model and Adam the rest.
Muon.matrices_only = True


@torch_names
def Adafactor(params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, wd=0.0, mom=0.0,
              multiply_by_parameter_scale=True, relative_step=True, clipping_threshold=...,
              foreach=None, maximize=False, impl="auto", master_weights=True):
    """Adafactor (Shazeer & Stern, 2018, arXiv:1804.04235), as torch.optim.Adafactor computes it,
    with its names and defaults: factored second moments (row and column means of g^2, decayed
    by `1 - step**beta2_decay`) for tensors of 2+ dimensions, full ones for vectors;
    `u = g / sqrt(V)` clipped to RMS `d`; `p <- p (1 - lr wd)`;
    `p <- p - min(lr, 1/sqrt(step)) max(eps2, RMS(p)) u` (`eps = (eps1, eps2)`, eps1 None: the
    dtype's machine epsilon; in a parameter group give `eps1` and `eps2`).

    optax's options, as flags: `mom` (optax's `momentum`, torch's name accepted: an exponential
    average of the steps, `grad_avg <- lerp(grad_avg, step, 1 - mom)`, `p <- p - grad_avg`;
    given > 0 when the optimizer is built), `clipping_threshold` (optax's name for `d`; when
    given it replaces `d`, None: no clipping), `multiply_by_parameter_scale=False` (no
    `max(eps2, RMS(p))` factor), `relative_step=False` (the step is `lr`, not
    `min(lr, 1/sqrt(step))`).  `foreach` is accepted and ignored; `maximize=True` is refused."""
    if maximize:
        raise ValueError("Adafactor: maximize=True is not supported (negate the loss)")
    eps1, eps2 = eps
    if clipping_threshold is not ...:
        d = clipping_threshold
    flags = {k: v for k, v in dict(multiply_by_parameter_scale=multiply_by_parameter_scale,
                                   relative_step=relative_step).items() if v is not True}
    update = partial(adafactor_update, **flags) if flags else adafactor_update
    with_momentum = mom is not None and mom != 0
    cbs = [step_stat, adafactor_param_scale, weight_decay, factored_sqr_avg, update,
           averaged_adafactor_step if with_momentum else adafactor_step]
    momentum = dict(mom=mom) if with_momentum else {}
    return Optimizer(params, cbs, lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d,
                     wd=wd, impl=impl, master_weights=master_weights, **momentum)


@torch_names
def SOAP(params, lr=3e-3, mom=0.95, sqr_mom=0.95, shampoo_beta=0.95, eps=1e-8, wd=0.01,
         precondition_frequency=10, max_precond_dim=10000, impl="auto", master_weights=True):
    """SOAP (Vyas et al., 2024, arXiv:2409.11321): Adam in the eigenbasis of Shampoo's Kronecker
    factors (`L = EMA(G G^T)`, `R = EMA(G^T G)`, one per dimension of at most `max_precond_dim`,
    decayed by `shampoo_beta`), the basis taken by eigh at the first step (which moves nothing)
    and refreshed every `precondition_frequency` steps by a power iteration and QR; decoupled
    weight decay `p <- p (1 - lr wd)` after the step.  Defaults are the paper's (betas 0.95,
    0.95).  Vectors run as plain Adam."""
    return Optimizer(params, [step_stat, soap_step], lr=lr, mom=mom, sqr_mom=sqr_mom,
                     shampoo_beta=shampoo_beta, eps=eps, wd=wd,
                     precondition_frequency=precondition_frequency,
                     max_precond_dim=max_precond_dim, impl=impl, master_weights=master_weights)


#: Names of the modules `muon_with_adamw` leaves to AdamW as output layers (heads).
HEAD_NAMES = ("lm_head", "head", "classifier", "fc_out", "output", "out_proj_final")


def hidden_matrices(model, head_names=HEAD_NAMES) -> list[torch.Tensor]:
    """The parameters Muon is for in `model` (an nn.Module, or named parameters): those of 2+
    dimensions that are not an embedding's (an `nn.Embedding`, or a name containing "embed")
    nor a head's (a module named in `head_names`, as the last part of its name or anywhere on
    its path: `lm_head.weight`, `model.classifier.weight`)."""
    if isinstance(model, torch.nn.Module):
        named = list(model.named_parameters())
        embedded = {id(p) for m in model.modules()
                    if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                    for p in m.parameters()}
    else:
        named = [(n, p) for n, p in model]
        embedded = set()
    found = []
    for name, p in named:
        parts = name.split(".")[:-1]
        if p.ndim < 2 or id(p) in embedded or "embed" in name or \
                any(part in head_names for part in parts):
            continue
        found.append(p)
    return found


def muon_with_adamw(model, lr=0.02, wd=0.1, mom=0.95, nesterov=True, ns_steps=5,
                    adjust_lr_fn=None, adamw_lr=3e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
                    adamw_wd=0.0, head_names=HEAD_NAMES, impl="auto", master_weights=True):
    """Muon (Jordan et al., 2024) for the hidden matrices of `model`, AdamW for the rest
    (embeddings, head, biases, norms), as modded-nanogpt and Moonlight (Liu et al., 2025,
    arXiv:2502.16982) train: one routed optimizer (`optcraft.routing.route`) whose groups name
    their chain ("muon" or "adamw").  `model` is an nn.Module (embeddings found by type, heads
    by name, see `hidden_matrices`), or its named parameters, or plain parameters (then every
    parameter of 2+ dimensions is hidden).  Convolution weights run on Muon flattened (so does
    any hidden tensor of 3+ dimensions, as `(shape[0], -1)`).

    Defaults: Muon `lr=0.02, wd=0.1, mom=0.95, nesterov=True, ns_steps=5` (modded-nanogpt's
    rate, torch's decay); AdamW `adamw_lr=3e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
    adamw_wd=0.0`."""
    if isinstance(model, torch.nn.Module):
        params = list(model.named_parameters())
        hidden = {id(p) for p in hidden_matrices(model, head_names)}
    else:
        params = list(model)
        named = all(isinstance(x, tuple) and len(x) == 2 for x in params)
        if named:
            hidden = {id(p) for p in hidden_matrices(params, head_names)}
        else:
            hidden = {id(p) for p in params if isinstance(p, torch.Tensor) and p.ndim >= 2}

    def is_hidden(p):
        return id(p) in hidden

    return route(params,
                 part(Muon, where=is_hidden, name="muon", lr=lr, wd=wd, mom=mom,
                      nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                      flatten=True),
                 part(Adam, name="adamw", lr=adamw_lr, betas=adamw_betas, eps=adamw_eps,
                      wd=adamw_wd),
                 impl=impl, master_weights=master_weights)
