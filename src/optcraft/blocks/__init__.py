"""Building blocks: each a few lines of tensor arithmetic with the seed's names, and the
specification each declares (`base`)."""
from .base import (PerParam, Spec, StateRule, block, group, is_block, is_zero, like_param,
                   nonnegative, number, optional, scalar, shaped, spec_of, summed, transient)
from .decay import l2_reg, weight_decay
from .layerwise import lamb_blocks, lamb_step, lamb_trust_ratio, larc_layer_lr, larc_step
from .research import (average_deviation, badam_step, centralize_grad, debiased_momentum_step,
                       deviation_step, keep_param, last_update, mean_abs_param,
                       record_channel_rms, restore_channel_rms, sadam_step, scale_grad_to_param,
                       sign_grad, stable_adam_step, unit_momentum_step)
from .sign import adam_root_step, lars_step, lion_step, nesterov_step
from .stats import average_grad, average_sqr_grad, step_stat
from .steps import adam_step, debias, momentum_step, qhadam_step, radam_step, rms_prop_step, sgd_step

__all__ = [
    "block", "is_block", "Spec", "StateRule", "spec_of", "is_zero", "PerParam",
    "like_param", "shaped", "scalar", "number", "transient", "group", "summed", "optional",
    "nonnegative",
    "sgd_step", "weight_decay", "l2_reg", "average_grad", "average_sqr_grad", "momentum_step",
    "rms_prop_step", "step_stat", "debias", "adam_step", "radam_step", "qhadam_step",
    "larc_layer_lr", "larc_step", "lamb_blocks", "lamb_trust_ratio", "lamb_step",
    "centralize_grad", "scale_grad_to_param", "sign_grad", "average_deviation", "mean_abs_param",
    "record_channel_rms", "sadam_step", "stable_adam_step", "restore_channel_rms",
    "unit_momentum_step", "debiased_momentum_step", "deviation_step", "badam_step",
    "keep_param", "last_update",
    "lion_step", "nesterov_step", "adam_root_step", "lars_step",
]
