"""optcraft: composable PyTorch optimizers.

An optimizer is a short chain of building blocks (fastai's design), it is a real
`torch.optim.Optimizer`, and every block runs over all parameters of a group at once.
"""
from .blocks import (adam_step, average_grad, average_sqr_grad, block, debias, l2_reg, lamb_step,
                     lamb_trust_ratio, larc_layer_lr, larc_step, momentum_step, qhadam_step,
                     radam_step, rms_prop_step, sgd_step, step_stat, weight_decay)
from .blocks import (centralize_grad, keep_param, last_update, lion_step, nesterov_step,
                     record_channel_rms, restore_channel_rms)
from . import blocks, compiler_hints, engine, groups, optax, predicates, schedules, tensorlist, transforms
from .groups import param_groups
from .optimizer import Optimizer
from .optimizers.classic import (QHAdam, RAdam, RMSProp, SGD, Adam, AdamW, Lamb, Larc, RMSprop,
                                 ranger)
from .optimizers.lr_free import AdamWScheduleFree, Prodigy, SGDScheduleFree, schedule_free
from .optimizers.matrix import SOAP, Adafactor, Muon, hidden_matrices, muon_with_adamw
from .optimizers.modern import ADOPT, MARS, Adan, Lion
from .optimizers.torch_family import ASGD, Adadelta, Adagrad, Adamax, NAdam, Rprop
from .optimizers.research import (LAMB, UM, AdamAWD, AdamGC, BAdam, DuvAdam, PreLAMB, SAdam,
                                  SRAdam, StableAdam, SUAdam, record_updates, with_blocks)
from .plots import plot_radam_rectifier
from .predicates import by_name, by_ndim, conv_not_cinEq256_coutLt256, conv_weight
from .routing import Part, part, route
from .tensorlist import ParamList, TensorList
from .transforms import (Transformed, accumulate, adaptive_clip, clip_by_global_norm,
                         skip_nonfinite)
from .wrappers import Lookahead, OptimWrapper, detuplify_pg, pytorch_hp_map, set_item_pg

__version__ = "0.1.0"

__all__ = [
    "Optimizer", "OptimWrapper", "Lookahead", "TensorList", "ParamList", "block",
    "route", "part", "Part",
    # the optimizers people train with today (docs/modern-*.md)
    "Adagrad", "Adadelta", "Adamax", "NAdam", "ASGD", "Rprop", "Lion", "ADOPT", "Adan", "MARS",
    "AdamWScheduleFree", "SGDScheduleFree", "Prodigy", "schedule_free",
    "Muon", "Adafactor", "SOAP", "muon_with_adamw", "hidden_matrices",
    "SGD", "RMSProp", "Adam", "RAdam", "QHAdam", "Larc", "Lamb", "ranger",
    "sgd_step", "weight_decay", "l2_reg", "average_grad", "average_sqr_grad", "momentum_step",
    "rms_prop_step", "step_stat", "debias", "adam_step", "radam_step", "qhadam_step",
    "larc_layer_lr", "larc_step", "lamb_trust_ratio", "lamb_step",
    "detuplify_pg", "set_item_pg", "pytorch_hp_map",
    "schedules", "optax", "transforms", "groups", "param_groups",
    "Transformed", "clip_by_global_norm", "adaptive_clip", "skip_nonfinite", "accumulate",
    # the research recipes of seed 003 (docs/research.md), their blocks and predicates
    "SAdam", "SRAdam", "LAMB", "AdamGC", "StableAdam", "AdamAWD", "UM", "PreLAMB", "DuvAdam",
    "SUAdam", "BAdam", "with_blocks", "record_updates", "plot_radam_rectifier",
    "centralize_grad", "record_channel_rms", "restore_channel_rms", "keep_param", "last_update",
    "lion_step", "nesterov_step",
    "blocks", "predicates", "conv_weight", "conv_not_cinEq256_coutLt256", "by_name", "by_ndim",
]
