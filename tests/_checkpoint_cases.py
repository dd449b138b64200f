"""Optimizers, wrappers and transforms whose checkpoints must resume bit for bit (shared by the
in-process and fresh-process tests)."""
import math

import torch

import optcraft as oc
from optcraft import optax, schedules
from optcraft.transforms import (Transformed, accumulate, adaptive_clip, clip_by_global_norm,
                                 skip_nonfinite)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


CASES = {
    "SGD": lambda m: oc.SGD(m.parameters(), lr=0.05, mom=0.9, wd=1e-2),
    "RMSProp": lambda m: oc.RMSProp(m.parameters(), lr=1e-3, mom=0.9),
    "Adam": lambda m: oc.Adam(m.parameters(), lr=1e-2),
    "RAdam": lambda m: oc.RAdam(m.parameters(), lr=1e-2),
    "QHAdam": lambda m: oc.QHAdam(m.parameters(), lr=1e-2),
    "Larc": lambda m: oc.Larc(m.parameters(), lr=0.1),
    "Lamb": lambda m: oc.Lamb([list(m[0].parameters()), list(m[2].parameters())],
                              lr=[1e-3, 1e-2], wd=0.01),
    "ranger": lambda m: oc.ranger(m.parameters(), lr=1e-2),
    "Lookahead(Adam)": lambda m: oc.Lookahead(oc.Adam(m.parameters(), lr=1e-2), k=3),
    "OptimWrapper(torch AdamW)": lambda m: oc.OptimWrapper(torch.optim.AdamW(m.parameters(),
                                                                             lr=1e-2)),
    # the research recipes; the per-channel ones on the linear weights (the model has no conv)
    **{name: (lambda m, name=name: getattr(oc, name)(m.parameters(), lr=1e-2)) for name in
       ("SAdam", "SRAdam", "LAMB", "UM", "PreLAMB", "DuvAdam", "SUAdam", "BAdam")},
    **{name: (lambda m, name=name: getattr(oc, name)(m.parameters(), lr=1e-2,
                                                     predicate=oc.by_ndim(2)))
       for name in ("AdamGC", "StableAdam", "AdamAWD")},
    # schedules: progress (schedule_step) in the state dict, the schedules rebuilt with the code
    "Adam(lr, mom, wd schedules)": lambda m: oc.Adam(
        m.parameters(), lr=schedules.warmup_cosine(1e-2, 4, 20), mom=schedules.one_cycle_mom(20),
        wd=schedules.piecewise([0.0, 0.01], [10])),
    # transforms: the skip count, and accumulation buffers saved in the middle of a window
    "Transformed(SGD: skip, clip)": lambda m: Transformed(
        oc.SGD(m.parameters(), lr=0.05, mom=0.9), skip_nonfinite(), clip_by_global_norm(0.05)),
    "Transformed(torch AdamW: skip, accumulate, AGC)": lambda m: Transformed(
        torch.optim.AdamW(m.parameters(), lr=1e-2), skip_nonfinite(), accumulate(3),
        adaptive_clip(0.05)),
    "Transformed(Lookahead(Lamb): accumulate, clip)": lambda m: Transformed(
        oc.Lookahead(oc.Lamb(m.parameters(), lr=schedules.cosine(1e-2, 1e-3, 10)), k=2),
        accumulate(2), clip_by_global_norm(0.1)),
    # optax's recipes: masks (do_wd flags) and a scheduled learning rate
    "optax.lamb(mask, schedule)": lambda m: optax.lamb(
        m.named_parameters(), schedules.linear(1e-2, 1e-3, 20), weight_decay=0.01,
        mask=["0.weight", "2.weight"]),
}

#: cases whose data has batches with a NaN input (every gradient of that step is NaN), before
#: and after the checkpoint (taken after 7 batches: the accumulation case is then 5 micro-batches
#: in, in the middle of its second window of 3)
NONFINITE_BATCHES = {"Transformed(SGD: skip, clip)": (3, 10),
                     "Transformed(torch AdamW: skip, accumulate, AGC)": (2, 5, 12)}


def build(name, seed=0):
    model = _model(seed)
    g = torch.Generator().manual_seed(42)
    data = [(torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)) for _ in range(20)]
    for i in NONFINITE_BATCHES.get(name, ()):
        data[i][0][0, 0] = math.nan
    return model, CASES[name](model), data


def train(model, opt, data):
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
