"""Every example of seed 001 (fastai's optimizer documentation), with its expected values, and the
examples of seeds 000/002 where the API still applies.

The seed builds optimizers over Python ints (`Optimizer([1,2,3], noop)`); a torch optimizer takes
tensors, so those examples use distinct tensors and compare identities.  Everything else is the
seed's code with its numbers.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import tensor

from optcraft import (SGD, Adam, Lamb, Larc, Lookahead, OptimWrapper, Optimizer, QHAdam, RAdam,
                      RMSProp, average_grad, average_sqr_grad, detuplify_pg, l2_reg, set_item_pg,
                      sgd_step, step_stat, weight_decay)


def tst_param(val, grad=None):
    "Create a tensor with `val` and a gradient of `grad` for testing"
    res = tensor([val]).float()
    res.grad = tensor([val / 10 if grad is None else grad]).float()
    return res


def tst_params():
    return [tst_param(float(i)) for i in range(4)]


def noop(p, **kwargs):
    return p


def same(a, b):
    """Lists of tensors, compared by identity (the seed compares ints by value)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def tensors(n):
    return [torch.zeros(1) for _ in range(n)]


# ---- initialising ------------------------------------------------------------------------------

def test_params_become_param_lists():
    t = tensors(4)
    assert [same(a, b) for a, b in zip(Optimizer(t[:3], noop).param_lists, [t[:3]])] == [True]
    opt = Optimizer(iter(t[:3]), noop)
    assert same(opt.param_lists[0], t[:3]) and len(opt.param_lists) == 1
    opt = Optimizer([t[:2], t[2:3]], noop)
    assert len(opt.param_lists) == 2 and same(opt.param_lists[0], t[:2]) and \
        same(opt.param_lists[1], t[2:3])
    opt = Optimizer(([t[o], t[o + 1]] for o in range(0, 4, 2)), noop)
    assert same(opt.param_lists[0], t[:2]) and same(opt.param_lists[1], t[2:])


def tst_arg(p, lr=0, **kwargs):
    return p


tst_arg.defaults = dict(lr=1e-2)


def tst_arg2(p, lr2=0, **kwargs):
    return p


tst_arg2.defaults = dict(lr2=1e-3)


def tst_arg3(p, mom=0, **kwargs):
    return p


tst_arg3.defaults = dict(mom=0.9)


def tst_arg4(p, **kwargs):
    return p


def test_defaults_are_merged():
    t = tensors(4)
    opt = Optimizer(t[:3], [tst_arg, tst_arg2, tst_arg3])
    assert opt.hypers == [{'lr2': 1e-3, 'mom': 0.9, 'lr': 1e-2}]
    opt = Optimizer(t[:3], tst_arg, lr=0.1)
    assert opt.hypers == [{'lr': 0.1}]
    opt = Optimizer([t[:2], t[2:3]], tst_arg)
    assert opt.hypers == [{'lr': 1e-2}, {'lr': 1e-2}]
    opt = Optimizer([t[:2], t[2:3]], tst_arg, lr=0.1)
    assert opt.hypers == [{'lr': 0.1}, {'lr': 0.1}]
    opt = Optimizer(t[:3], [tst_arg4])
    assert opt.hypers == [{}]


def test_hypers_from_lists_and_slices():
    t = tensors(4)
    opt = Optimizer([t[:2], t[2:3]], tst_arg, lr=[0.1, 0.2])
    assert opt.hypers == [{'lr': 0.1}, {'lr': 0.2}]
    opt = Optimizer([t[:2], t[2:3], t[3:]], tst_arg, lr=slice(1e-2))
    assert opt.hypers == [{'lr': 1e-3}, {'lr': 1e-3}, {'lr': 1e-2}]
    opt = Optimizer([t[:2], t[2:3], t[3:]], tst_arg, lr=slice(1e-4, 1e-2))
    assert [h['lr'] for h in opt.hypers] == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    groups = opt.param_groups
    assert [{k: v for k, v in g.items() if k != 'params'} for g in groups] == \
        [{'lr': pytest.approx(1e-4)}, {'lr': pytest.approx(1e-3)}, {'lr': pytest.approx(1e-2)}]
    assert [same(g['params'], ps) for g, ps in zip(groups, [t[:2], t[2:3], t[3:]])] == [True] * 3
    with pytest.raises((TypeError, ValueError)):
        Optimizer([t[:2], t[2:3], t[3:]], tst_arg, lr=np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="2 values for 3 parameter group"):
        Optimizer([t[:2], t[2:3], t[3:]], tst_arg, lr=[0.1, 0.2])


# ---- basic steppers -----------------------------------------------------------------------------

def test_sgd_step():
    p = tst_param(1., 0.1)
    sgd_step(p, 1.)
    torch.testing.assert_close(p, tensor([0.9]))
    torch.testing.assert_close(p.grad, tensor([0.1]))


def test_weight_decay():
    p = tst_param(1., 0.1)
    weight_decay(p, 1., 0.1)
    torch.testing.assert_close(p, tensor([0.9]))
    torch.testing.assert_close(p.grad, tensor([0.1]))


def test_l2_reg():
    p = tst_param(1., 0.1)
    l2_reg(p, 1., 0.1)
    torch.testing.assert_close(p, tensor([1.]))
    torch.testing.assert_close(p.grad, tensor([0.2]))


# ---- making the step ----------------------------------------------------------------------------

def close(values, expected, tol=1e-5):
    assert values == pytest.approx(expected, abs=tol)


def test_step_examples():
    r = range(4)
    params = tst_params()
    Optimizer(params, sgd_step, lr=0.1).step()
    close([p.item() for p in params], [i * 0.99 for i in r])

    params = tst_params()
    Optimizer(params, [weight_decay, sgd_step], lr=0.1, wd=0.1).step()
    close([p.item() for p in params], [i * 0.98 for i in r])

    params = tst_params()
    opt = Optimizer(params, sgd_step, lr=0.1)
    params[-1].grad = None
    opt.step()
    close([p.item() for p in params], [0., 0.99, 1.98, 3.])

    params = tst_params()
    opt = Optimizer([params[:2], params[2:]], sgd_step, lr=0.1)
    opt.hypers[0]['lr'] = 0.01
    opt.step()
    close([p.item() for p in params], [0., 0.999, 1.98, 2.97])


def test_zero_grad():
    params = tst_params()
    opt = Optimizer(params, [weight_decay, sgd_step], lr=0.1, wd=0.1)
    opt.zero_grad()
    for p in params:
        torch.testing.assert_close(p.grad, tensor([0.]))


def tst_stat(p, **kwargs):
    s = kwargs.get('sum', torch.zeros_like(p)) + p.data
    return {'sum': s}


tst_stat.defaults = {'mom': 0.9}


def test_stat_callbacks():
    t = tensors(3)
    assert Optimizer(t, tst_stat).hypers == [{'mom': 0.9}]
    assert Optimizer(t, tst_stat, mom=0.99).hypers == [{'mom': 0.99}]
    x = torch.randn(4, 5)
    state = tst_stat(x)
    assert 'sum' in state
    torch.testing.assert_close(x, state['sum'])
    state = tst_stat(x, **state)
    torch.testing.assert_close(state['sum'], 2 * x)


def test_plain_stat_callback_in_an_optimizer():
    """A fastai callback returning new state works inside `step()`, per parameter."""
    params = tst_params()
    opt = Optimizer(params, [tst_stat, sgd_step], lr=0.1)
    opt.step()
    opt.step()
    for i, p in enumerate(params):
        # sum = p0 + p1 where p1 = 0.99 p0 (the stat runs before the step each time)
        torch.testing.assert_close(opt.state[p]['sum'], tensor([i + i * 0.99]))


# ---- statistics ---------------------------------------------------------------------------------

def test_average_grad():
    p = tst_param([1, 2, 3], [4, 5, 6])
    state = {}
    state = average_grad(p, mom=0.9, **state)
    torch.testing.assert_close(state['grad_avg'], p.grad)
    state = average_grad(p, mom=0.9, **state)
    torch.testing.assert_close(state['grad_avg'], p.grad * 1.9)
    state = {}
    state = average_grad(p, mom=0.9, dampening=True, **state)
    torch.testing.assert_close(state['grad_avg'], 0.1 * p.grad)
    state = average_grad(p, mom=0.9, dampening=True, **state)
    torch.testing.assert_close(state['grad_avg'], (0.1 * 0.9 + 0.1) * p.grad)


def test_average_sqr_grad():
    p = tst_param([1, 2, 3], [4, 5, 6])
    state = {}
    state = average_sqr_grad(p, sqr_mom=0.99, dampening=False, **state)
    torch.testing.assert_close(state['sqr_avg'], p.grad.pow(2))
    state = average_sqr_grad(p, sqr_mom=0.99, dampening=False, **state)
    torch.testing.assert_close(state['sqr_avg'], p.grad.pow(2) * 1.99)
    state = {}
    state = average_sqr_grad(p, sqr_mom=0.99, **state)
    torch.testing.assert_close(state['sqr_avg'], 0.01 * p.grad.pow(2))
    state = average_sqr_grad(p, sqr_mom=0.99, **state)
    torch.testing.assert_close(state['sqr_avg'], (0.01 * 0.99 + 0.01) * p.grad.pow(2))


# ---- freezing -------------------------------------------------------------------------------------

def requires_grad(ps):
    return [p.requires_grad for p in ps]


def test_freeze_to_and_unfreeze():
    params = [tst_params(), tst_params(), tst_params()]
    opt = Optimizer(params, sgd_step, lr=0.1)
    opt.freeze_to(1)
    assert requires_grad(params[0]) == [False] * 4
    for i in {1, 2}:
        assert requires_grad(params[i]) == [True] * 4
    opt.unfreeze()
    for i in range(2):
        assert requires_grad(params[i]) == [True] * 4
    with pytest.warns(UserWarning, match="whole model is frozen"):
        opt.freeze_to(3)
    assert all(requires_grad(params[i]) == [False] * 4 for i in range(3))


def test_force_train():
    params = [tst_params(), tst_params(), tst_params()]
    opt = Optimizer(params, sgd_step, lr=0.1)
    for p in [params[1][1], params[1][3]]:
        opt.state[p] = {'force_train': True}
    opt.freeze()
    assert requires_grad(params[0]) == [False] * 4
    assert requires_grad(params[1]) == [False, True, False, True]
    assert requires_grad(params[2]) == [True] * 4


# ---- serializing ----------------------------------------------------------------------------------

def test_state_dict_round_trip():
    p = tst_param([1, 2, 3], [4, 5, 6])
    opt = Optimizer(p, average_grad)
    opt.step()
    torch.testing.assert_close(opt.state[p]['grad_avg'], tensor([[4., 5., 6.]]))
    sd = opt.state_dict()
    p1 = tst_param([10, 20, 30], [40, 50, 60])
    opt = Optimizer(p1, average_grad, mom=0.99)
    assert opt.hypers[0]['mom'] == 0.99
    assert opt.state == {}
    opt.load_state_dict(sd)
    assert opt.hypers[0]['mom'] == 0.9
    torch.testing.assert_close(opt.state[p1]['grad_avg'], tensor([[4., 5., 6.]]))


def test_clear_state():
    p = tst_param([1, 2, 3], [4, 5, 6])
    opt = Optimizer(p, average_grad)
    opt.state[p] = {'force_train': True}
    opt.step()
    torch.testing.assert_close(opt.state[p]['grad_avg'], tensor([[4., 5., 6.]]))
    opt.clear_state()
    assert opt.state[p] == {'force_train': True}


# ---- optimizers -----------------------------------------------------------------------------------

def test_sgd():
    params = tst_params()
    opt = SGD(params, lr=0.1)
    opt.step()
    close([p.item() for p in params], [i * 0.99 for i in range(4)])
    opt.step()
    close([p.item() for p in params], [i * 0.98 for i in range(4)])


def test_sgd_momentum():
    params = tst_params()
    opt = SGD(params, lr=0.1, mom=0.9)
    assert isinstance(opt, Optimizer)
    opt.step()
    close([p.item() for p in params], [i * 0.99 for i in range(4)])
    opt.step()
    close([p.item() for p in params], [i * (1 - 0.1 * (0.1 + 0.1 * 1.9)) for i in range(4)])
    for i, p in enumerate(params):
        assert opt.state[p]['grad_avg'].item() == pytest.approx(i * 0.19, abs=1e-6)


def test_sgd_weight_decay_vs_l2():
    params = tst_params()
    opt = SGD(params, lr=0.1, mom=0.9, wd=0.1)
    opt.step()
    close([p.item() for p in params], [i * 0.98 for i in range(4)])
    # The seed left this expectation as a TODO ("this formula was wrong"; seed 000 had 0.97).
    # From the formula: a new optimizer, p = 0.98 i, g = 0.1 i (unchanged grads);
    # L2: g' = g + wd p = 0.1 i + 0.098 i; first momentum step: grad_avg = g'; p -= lr * g'.
    opt = SGD(params, lr=0.1, mom=0.9, wd=0.1, decouple_wd=False)
    opt.step()
    close([p.item() for p in params], [0.98 * i - 0.1 * (0.1 * i + 0.1 * 0.98 * i) for i in range(4)])


def test_rmsprop():
    params = tst_param([1, 2, 3], [0.1, 0.2, 0.3])
    opt = RMSProp(params, lr=0.1)
    opt.step()
    torch.testing.assert_close(params[0], tensor([0., 1., 2.]), atol=1e-4, rtol=0)
    opt.step()
    step = - 0.1 * 0.1 / (math.sqrt((0.01 * 0.99 + 0.01) * 0.1 ** 2) + 1e-8)
    torch.testing.assert_close(params[0], tensor([step, 1 + step, 2 + step]), atol=1e-4, rtol=0)


def test_rmsprop_momentum():
    params = tst_param([1, 2, 3], [0.1, 0.2, 0.3])
    opt = RMSProp(params, lr=0.1, mom=0.9)
    opt.step()
    torch.testing.assert_close(params[0], tensor([0., 1., 2.]), atol=1e-4, rtol=0)
    opt.step()
    step = - 0.1 * (0.1 + 0.9 * 0.1) / (math.sqrt((0.01 * 0.99 + 0.01) * 0.1 ** 2) + 1e-8)
    torch.testing.assert_close(params[0], tensor([step, 1 + step, 2 + step]), atol=1e-4, rtol=0)


def test_step_stat():
    p = tst_param(1, 0.1)
    state = {}
    state = step_stat(p, **state)
    assert state['step'] == 1
    for _ in range(5):
        state = step_stat(p, **state)
    assert state['step'] == 6


def test_adam():
    params = tst_param([1, 2, 3], [0.1, 0.2, 0.3])
    opt = Adam(params, lr=0.1, wd=0)
    opt.step()
    step = -0.1 * 0.1 / (math.sqrt(0.1 ** 2) + 1e-8)
    torch.testing.assert_close(params[0], tensor([1 + step, 2 + step, 3 + step]))
    opt.step()
    torch.testing.assert_close(params[0], tensor([1 + 2 * step, 2 + 2 * step, 3 + 2 * step]),
                               atol=1e-3, rtol=0)


def test_radam():
    params = tst_param([1, 2, 3], [0.1, 0.2, 0.3])
    opt = RAdam(params, lr=0.1)
    # The r factor is lower than 5 during the first 5 steps so updates use the average of
    # gradients (all the same)
    r_inf = 2 / (1 - 0.99) - 1
    for i in range(5):
        r = r_inf - 2 * (i + 1) * 0.99 ** (i + 1) / (1 - 0.99 ** (i + 1))
        assert r <= 5
        opt.step()
    p = tensor([0.95, 1.9, 2.85])
    torch.testing.assert_close(params[0], p)
    # The r factor is greater than 5 for the sixth step so we update with RAdam
    r = r_inf - 2 * 6 * 0.99 ** 6 / (1 - 0.99 ** 6)
    assert r > 5
    opt.step()
    v = math.sqrt(((r - 4) * (r - 2) * r_inf) / ((r_inf - 4) * (r_inf - 2) * r))
    step = -0.1 * 0.1 * v / (math.sqrt(0.1 ** 2) + 1e-8)
    torch.testing.assert_close(params[0], p + step, atol=1e-4, rtol=0)


def test_radam_rectifier_curve_goes_from_0_to_1():
    beta = 0.99
    r_inf = 2 / (1 - beta) - 1
    rs = np.array([r_inf - 2 * s * beta ** s / (1 - beta ** s) for s in range(5, 500)])
    v = np.sqrt(((rs - 4) * (rs - 2) * r_inf) / ((r_inf - 4) * (r_inf - 2) * rs))
    assert v[0] < 0.1 and 0.9 < v[-1] <= 1 and np.all(np.diff(v) > 0)


def test_qhadam():
    params = tst_param([1, 2, 3], [0.1, 0.2, 0.3])
    opt = QHAdam(params, lr=0.1)
    opt.step()
    step = -0.1 * (((1 - 0.7) * 0.1) + (0.7 * 0.1)) / (
        math.sqrt(((1 - 1.0) * 0.1 ** 2) + (1.0 * 0.1 ** 2)) + 1e-8)
    torch.testing.assert_close(params[0], tensor([1 + step, 2 + step, 3 + step]))
    opt.step()
    torch.testing.assert_close(params[0], tensor([1 + 2 * step, 2 + 2 * step, 3 + 2 * step]),
                               atol=1e-3, rtol=0)


def test_larc():
    params = [tst_param([1, 2, 3], [0.1, 0.2, 0.3]), tst_param([1, 2, 3], [0.01, 0.02, 0.03])]
    opt = Larc(params, lr=0.1)
    opt.step()
    # First param local lr is 0.02 < lr so it's not clipped
    assert float(opt.state[params[0]]['local_lr']) == pytest.approx(0.02, rel=1e-5)
    # Second param local lr is 0.2 > lr so it's clipped
    assert float(opt.state[params[1]]['local_lr']) == pytest.approx(0.1, rel=1e-7)
    torch.testing.assert_close(params[0], tensor([[0.998, 1.996, 2.994]]))
    torch.testing.assert_close(params[1], tensor([[0.999, 1.998, 2.997]]))


def test_lars_without_clip():
    params = [tst_param([1, 2, 3], [0.1, 0.2, 0.3]), tst_param([1, 2, 3], [0.01, 0.02, 0.03])]
    opt = Larc(params, lr=0.1, clip=False)
    opt.step()
    assert float(opt.state[params[0]]['local_lr']) == pytest.approx(0.02, rel=1e-5)
    assert float(opt.state[params[1]]['local_lr']) == pytest.approx(0.2, rel=1e-5)
    torch.testing.assert_close(params[0], tensor([[0.998, 1.996, 2.994]]))
    torch.testing.assert_close(params[1], tensor([[0.998, 1.996, 2.994]]))


def test_lamb():
    params = tst_param([1, 2, 3], [0.1, 0.2, 0.3])
    opt = Lamb(params, lr=0.1)
    opt.step()
    torch.testing.assert_close(params[0], tensor([0.7840, 1.7840, 2.7840]), atol=1e-3, rtol=0)


def test_lookahead():
    params = tst_param([1, 2, 3], [0.1, 0.2, 0.3])
    p, g = params[0].data.clone(), tensor([0.1, 0.2, 0.3])
    opt = Lookahead(SGD(params, lr=0.1))
    for k in range(5):
        opt.step()
    # first 5 steps are normal SGD steps
    torch.testing.assert_close(params[0], p - 0.5 * g)
    # Since k=6, sixth step is a moving average of the 6 SGD steps with the initial weight
    opt.step()
    torch.testing.assert_close(params[0], p * 0.5 + (p - 0.6 * g) * 0.5)


# ---- OptimWrapper -------------------------------------------------------------------------------

def test_detuplify_pg():
    tst = {'lr': 1e-2, 'mom': 0.9, 'params': [0, 1, 2]}
    assert detuplify_pg(tst) == {'lr': 1e-2, 'mom': 0.9}
    tst = {'lr': 1e-2, 'betas': (0.9, 0.999), 'params': [0, 1, 2]}
    assert detuplify_pg(tst) == {'lr': 1e-2, 'betas__0': 0.9, 'betas__1': 0.999}


def test_set_item_pg():
    tst = {'lr': 1e-2, 'mom': 0.9, 'params': [0, 1, 2]}
    assert set_item_pg(tst, 'lr', 1e-3) == {'lr': 1e-3, 'mom': 0.9, 'params': [0, 1, 2]}
    tst = {'lr': 1e-2, 'betas': (0.9, 0.999), 'params': [0, 1, 2]}
    assert set_item_pg(tst, 'betas__0', 0.95) == {'lr': 1e-2, 'betas': (0.95, 0.999),
                                                  'params': [0, 1, 2]}


def test_optim_wrapper_one_group():
    sgd = SGD([tensor([1., 2, 3])], lr=1e-3, mom=0.9, wd=1e-2)
    tst_sgd = OptimWrapper(torch.optim.SGD([tensor([1., 2, 3])], lr=1e-3, momentum=0.9,
                                           weight_decay=1e-2))
    # Access to param_groups
    assert [[p.tolist() for p in ps] for ps in tst_sgd.param_lists] == \
        [[p.tolist() for p in ps] for ps in sgd.param_lists]
    # Set param_groups
    new = tensor([4., 5, 6])
    tst_sgd.param_lists = [[new]]
    assert tst_sgd.opt.param_groups[0]['params'][0] is new
    # Access to hypers
    assert tst_sgd.hypers == [{**sgd.hypers[0], 'dampening': 0., 'nesterov': False}]
    # Set hypers
    tst_sgd.set_hyper('mom', 0.95)
    assert tst_sgd.opt.param_groups[0]['momentum'] == 0.95


def test_optim_wrapper_two_groups():
    a, b = tensor([1., 2, 3]), tensor([4., 5, 6])
    tst_sgd = OptimWrapper(torch.optim.SGD([{'params': [a], 'lr': 1e-3},
                                            {'params': [b], 'lr': 1e-2}],
                                           momentum=0.9, weight_decay=1e-2))
    sgd = SGD([[tensor([1., 2, 3])], [tensor([4., 5, 6])]], lr=[1e-3, 1e-2], mom=0.9, wd=1e-2)
    assert [[p.tolist() for p in ps] for ps in tst_sgd.param_lists] == \
        [[p.tolist() for p in ps] for ps in sgd.param_lists]
    tst_sgd.param_lists = [[b], [a]]
    assert tst_sgd.opt.param_groups[0]['params'][0] is b
    assert tst_sgd.opt.param_groups[1]['params'][0] is a
    assert tst_sgd.hypers == [{**sgd.hypers[i], 'dampening': 0., 'nesterov': False}
                              for i in range(2)]
    tst_sgd.set_hyper('mom', 0.95)
    assert [pg['momentum'] for pg in tst_sgd.opt.param_groups] == [0.95, 0.95]
    tst_sgd.set_hyper('lr', [1e-4, 1e-3])
    assert [pg['lr'] for pg in tst_sgd.opt.param_groups] == [1e-4, 1e-3]


def _mock_train(m, x, y, opt):
    m.train()
    for i in range(0, 100, 25):
        z = m(x[i:i + 25])
        loss = torch.nn.functional.mse_loss(z, y[i:i + 25])
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("torch_cls, decouple", [(torch.optim.AdamW, True),
                                                 (torch.optim.Adam, False)])
def test_adam_matches_torch_through_optim_wrapper(torch_cls, decouple):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 5)
    x, y = torch.randn(100, 3, 4), torch.randn(100, 3, 5)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    opt1 = OptimWrapper(torch_cls(m.parameters(), betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2))
    _mock_train(m, x.clone(), y.clone(), opt1)
    wgt1, bias1 = m.weight.data.clone(), m.bias.data.clone()
    m.load_state_dict(start)
    opt2 = Adam(m.parameters(), 1e-3, wd=1e-2, decouple_wd=decouple)
    _mock_train(m, x.clone(), y.clone(), opt2)
    torch.testing.assert_close(m.weight.data, wgt1, atol=1e-3, rtol=0)
    torch.testing.assert_close(m.bias.data, bias1, atol=1e-3, rtol=0)
