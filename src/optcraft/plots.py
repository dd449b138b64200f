"""Figures for the research optimizers (matplotlib is an optional dependency: `optcraft[cli]`)."""
from __future__ import annotations

import math

from .blocks.research import rectifier


def plot_radam_rectifier(beta: float, length: int):
    """RAdam's variance rectification over the first `length` steps, for `beta` (the `sqr_mom`,
    beta2, of RAdam and SRAdam): a matplotlib `Figure` with two axes.

    Left: the rectifier of the paper (Liu et al., 2020, arXiv:1908.03265),
    `r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))`, which scales
    the adaptive step; it is undefined (a gap, where the step is plain momentum) while
    `rho_t <= 4`.  Right: `rho_t = rho_inf - 2 t beta**t / (1 - beta**t)`, its limit
    `rho_inf = 2 / (1 - beta) - 1` and the threshold 4.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_radam_rectifier needs matplotlib: pip install optcraft[cli]") \
            from error
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an integer >= 1, got {length!r}")
    steps = list(range(1, length + 1))
    rho_inf = 2 / (1 - beta) - 1
    rhos = [rho_inf - 2 * t * beta ** t / (1 - beta ** t) for t in steps]
    rectified = []
    for t in steps:
        tractable, r = rectifier(beta, t)
        rectified.append(r ** -0.5 if tractable else math.nan)
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(steps, rectified, marker="o", markersize=3)
    left.set(title=f"rectifier r_t (beta = {beta:g})", xlabel="step t", ylabel="r_t")
    right.plot(steps, rhos, label="rho_t")
    right.axhline(rho_inf, color="C1", linestyle="--", label="rho_inf")
    right.axhline(4, color="C2", linestyle=":", label="4: adaptive step above")
    right.set(title="length of the approximated SMA", xlabel="step t", ylabel="rho")
    right.legend()
    return fig
