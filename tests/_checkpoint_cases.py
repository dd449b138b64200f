"""Optimizers, wrappers and transforms whose checkpoints must resume bit for bit (shared by the
in-process and fresh-process tests)."""
import torch

import optcraft as oc


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
}


def build(name, seed=0):
    model = _model(seed)
    g = torch.Generator().manual_seed(42)
    data = [(torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)) for _ in range(20)]
    return model, CASES[name](model), data


def train(model, opt, data):
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
