"""Building blocks: each a few lines of tensor arithmetic with the seed's names."""
from .base import block, is_block
from .decay import l2_reg, weight_decay
from .layerwise import lamb_step, larc_layer_lr, larc_step
from .stats import average_grad, average_sqr_grad, step_stat
from .steps import adam_step, debias, momentum_step, qhadam_step, radam_step, rms_prop_step, sgd_step

__all__ = [
    "block", "is_block",
    "sgd_step", "weight_decay", "l2_reg", "average_grad", "average_sqr_grad", "momentum_step",
    "rms_prop_step", "step_stat", "debias", "adam_step", "radam_step", "qhadam_step",
    "larc_layer_lr", "larc_step", "lamb_step",
]
