"""param_groups(model, ...): which parameters are decayed, per-group learning rates (layer-wise
decay, fastai's slices), and that the ratio between groups survives torch's schedulers, on
torch.optim and on optcraft's optimizers alike."""
import pytest
import torch
from torch import nn

import optcraft as oc
from optcraft import optax, schedules
from optcraft.groups import param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.randn(3, 4))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
                                    for _ in range(3))
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, idx):
        x = self.embed(idx) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(1)))


def names_of(model, group):
    ids = {id(p): n for n, p in model.named_parameters()}
    return sorted(ids[id(p)] for p in group["params"])


def test_biases_norms_and_embeddings_are_not_decayed():
    model = Net()
    groups = param_groups(model, wd=0.05)
    assert len(groups) == 2
    assert names_of(model, groups[0]) == sorted(
        ["pos", "blocks.0.0.weight", "blocks.1.0.weight", "blocks.2.0.weight", "head.weight"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "embed.weight" in names_of(model, groups[1])  # 2-d, excluded by its module type
    assert "lr" not in groups[0]


def test_rules_by_name_ndim_and_type_are_each_optional():
    model = Net()
    by_name = param_groups(model, no_decay_names=["pos", "*.bias"])
    assert "pos" in names_of(model, by_name[1])
    decay_all = param_groups(model, no_decay_types=(), no_decay_ndim=None, no_decay_names=())
    assert len(decay_all) == 1 and len(decay_all[0]["params"]) == len(list(model.parameters()))
    only_types = param_groups(model, no_decay_ndim=None, no_decay_names=())
    assert sorted(names_of(model, only_types[1])) == sorted(
        ["embed.weight", "norm.weight", "norm.bias"] +
        [f"blocks.{i}.1.{k}" for i in range(3) for k in ("weight", "bias")])


def layers(model):
    return [[model.embed, model.pos], *model.blocks, [model.norm, model.head]]


def test_layer_decay_scales_each_layer():
    model = Net()
    groups = param_groups(model, lr=1e-3, splits=layers, layer_decay=0.5)
    # 5 layers: embed+pos, 3 blocks, norm+head; each has decayed and undecayed parameters
    lrs = [g["lr"] for g in groups]
    assert lrs == pytest.approx([1e-3 * 0.5 ** 4] * 2 + [1e-3 * 0.5 ** 3] * 2 +
                                [1e-3 * 0.5 ** 2] * 2 + [1e-3 * 0.5] * 2 + [1e-3] * 2)
    assert [g.get("weight_decay") for g in groups] == [None, 0.0] * 5


def test_splits_given_as_modules_parameters_or_a_splitter():
    model = Net()
    modules = [[model.embed, model.pos], model.blocks, [model.norm, model.head]]
    params = [[*model.embed.parameters(), model.pos], list(model.blocks.parameters()),
              [*model.norm.parameters(), model.head.weight]]
    splitter = lambda m: [[m.embed, m.pos], m.blocks, [m.norm, m.head]]  # noqa: E731
    # fastai's slice(a, b): a * (b/a) ** (i / (n-1)) for split i of n; slice(b): b/10, ..., b
    for splits in (modules, params, splitter):
        groups = param_groups(model, lr=slice(1e-5, 1e-3), splits=splits)
        assert [g["lr"] for g in groups] == pytest.approx([1e-5] * 2 + [1e-4] * 2 + [1e-3] * 2)
        assert [names_of(model, g) for g in groups[:2]] == [["pos"], ["embed.weight"]]
    groups = param_groups(model, lr=slice(1e-3), splits=modules)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4] * 4 + [1e-3] * 2)
    groups = param_groups(model, lr=[1e-3, 2e-3, 3e-3], splits=modules)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 2e-3, 2e-3, 3e-3, 3e-3]


def test_splits_must_cover_the_model_once():
    model = Net()
    with pytest.raises(ValueError, match=r"parameter\(s\) in no split: 'embed.weight'"):
        param_groups(model, splits=[[model.pos], model.blocks, model.norm, model.head])
    with pytest.raises(ValueError, match="'pos' is in split 0 and in split 1"):
        param_groups(model, splits=[[model.pos], [model.pos, *model.embed.parameters()],
                                    model.blocks, model.norm, model.head])
    with pytest.raises(ValueError, match="not the model's"):
        param_groups(model, splits=[[nn.Parameter(torch.zeros(1))], model])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(layer_decay=0.8), ValueError, "layer_decay needs lr"),
    (dict(lr=1e-3, layer_decay=1.5), ValueError, r"layer_decay must be in \(0, 1\]"),
    (dict(lr=slice(1e-4, 1e-2), layer_decay=0.8), ValueError, "either layer_decay or one lr"),
    (dict(lr=[1e-3, 1e-4]), ValueError, "got 2 learning rates for 1 split"),
    (dict(lr=-1.0), ValueError, "lr must be >= 0"),
    (dict(lr="fast"), TypeError, "lr must be a number"),
    (dict(wd=-0.1), ValueError, "wd must be a number >= 0"),
    (dict(no_decay_names="bias"), TypeError, "list of patterns"),
    (dict(splits=nn.Linear(2, 2)), TypeError, "splits must be a list"),
])
def test_bad_arguments_name_the_problem(kwargs, error, match):
    with pytest.raises(error, match=match):
        param_groups(Net(), **kwargs)


def test_not_a_model_or_no_parameters():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        param_groups([torch.zeros(1)])
    with pytest.raises(ValueError, match="no parameters"):
        param_groups(nn.ReLU())


# ---- feeding optimizers ------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda groups: torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5),
    lambda groups: oc.Adam(groups, lr=0.1, wd=0.5),
    lambda groups: optax.adamw(groups, 0.1, weight_decay=0.5),
], ids=["torch-AdamW", "optcraft-Adam", "optax-adamw"])
def test_undecayed_groups_are_not_decayed_by_any_optimizer(make):
    # with zero gradients Adam's step is 0: only weight decay moves a parameter
    model = Net()
    groups = param_groups(model)
    opt = make(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = set(names_of(model, groups[0]))
    for n, p in model.named_parameters():
        want = before[n] * (1 - 0.1 * 0.5) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0)


def lr_ratios(opt):
    lrs = [g["lr"] for g in opt.param_groups]
    return [lr / lrs[-1] for lr in lrs]


def drive(opt, scheduler, steps, model):
    seen = []
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randint(0, 10, (5, 3))).sum().backward()
        opt.step()
        scheduler.step()
        seen.append(lr_ratios(opt))
    return seen


@pytest.mark.parametrize("make_opt", [
    lambda groups: torch.optim.AdamW(groups),
    lambda groups: oc.Adam(groups, lr=1.0),
], ids=["torch-AdamW", "optcraft-Adam"])
@pytest.mark.parametrize("make_sched", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=12),
], ids=["StepLR", "OneCycleLR"])
def test_layer_scales_survive_torch_schedulers(make_opt, make_sched):
    model = Net()
    groups = param_groups(model, lr=1e-2, wd=0.05, splits=layers, layer_decay=0.5)
    want = [0.5 ** 4] * 2 + [0.5 ** 3] * 2 + [0.5 ** 2] * 2 + [0.5] * 2 + [1.0] * 2
    opt = make_opt(groups)
    assert lr_ratios(opt) == pytest.approx(want)
    first_lr = opt.param_groups[-1]["lr"]
    for ratios in drive(opt, make_sched(opt), 10, model):
        assert ratios == pytest.approx(want, rel=1e-9)
    assert opt.param_groups[-1]["lr"] != pytest.approx(first_lr)  # the scheduler did act


def test_a_schedule_lr_is_scaled_per_group_for_optcraft():
    model = Net()
    sched = schedules.warmup_cosine(1e-2, 2, 10)
    groups = param_groups(model, lr=sched, splits=layers, layer_decay=0.5)
    opt = oc.Adam(groups, lr=1.0)
    for step in range(4):
        opt.zero_grad()
        model(torch.randint(0, 10, (5, 3))).sum().backward()
        opt.step()
    # param_groups show the value the last step used (step 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [sched(3) * s for s in [0.5 ** 4] * 2 + [0.5 ** 3] * 2 + [0.5 ** 2] * 2 + [0.5] * 2 +
         [1.0] * 2])


def test_named_groups_give_torch_param_names_and_optax_masks_by_name():
    model = Net()
    groups = param_groups(model, named=True)
    opt = torch.optim.SGD(groups, lr=0.1)
    assert sorted(opt.param_groups[0]["param_names"]) == names_of(model, groups[0])
    lamb = optax.lamb(param_groups(model, named=True), 1e-3, weight_decay=0.1,
                      mask=["head.weight"])
    flags = {n: lamb.state[p].get("do_wd", True) for g in lamb.param_groups
             for n, p in zip(g["param_names"], g["params"])}
    assert [n for n, keep in flags.items() if keep] == ["head.weight"]
