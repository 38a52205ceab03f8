"""Every fast execution path equals the reference loop, forward and backward."""
import pytest
import torch

from pce.moe.dispatch import dispatch_dense, dispatch_fused, dispatch_reference, dispatch_sparse
from pce.moe.experts import EXPERTS, build_expert_bank


def _clone_bank(bank):
    import copy
    return copy.deepcopy(bank)


def _run(fn, bank, tokens, weights):
    bank = _clone_bank(bank)
    t = tokens.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    out = fn(bank, t, w)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in bank.named_parameters() if p.grad is not None}
    return out, t.grad, w.grad, grads, bank


def _assert_same(a, b, atol=1e-4):
    out_a, tg_a, wg_a, pg_a, bank_a = a
    out_b, tg_b, wg_b, pg_b, bank_b = b
    assert out_a.abs().sum() > 0
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=1e-4)
    torch.testing.assert_close(tg_a, tg_b, atol=atol, rtol=1e-4)
    torch.testing.assert_close(wg_a, wg_b, atol=atol, rtol=1e-4)
    assert pg_a.keys() == pg_b.keys()
    for k in pg_a:
        torch.testing.assert_close(pg_a[k], pg_b[k], atol=atol, rtol=1e-3, msg=k)
    # batch-norm running statistics were updated identically
    for (n, x), (_, y) in zip(bank_a.named_buffers(), bank_b.named_buffers()):
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("expert", EXPERTS.names())
@pytest.mark.parametrize("E", [1, 3, 8])
@pytest.mark.parametrize("n", [2, 4])
def test_dense_equals_reference_for_soft_routing(expert, E, n):
    bank = build_expert_bank(expert, E, 6, 5)
    tokens = torch.randn(12, 6, n, n)
    weights = torch.rand(12, E).softmax(-1)
    ref = _run(dispatch_reference, bank, tokens, weights)
    _assert_same(ref, _run(dispatch_fused, bank, tokens, weights))
    _assert_same(ref, _run(dispatch_dense, bank, tokens, weights))
    _assert_same(ref, _run(dispatch_sparse, bank, tokens, weights))


@pytest.mark.parametrize("expert", EXPERTS.names())
@pytest.mark.parametrize("E,k", [(2, 1), (4, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("drops", [True, False])  # top-1 without drops takes the row-permutation path
def test_sparse_equals_reference_with_top_k_and_drops(expert, E, k, drops):
    bank = build_expert_bank(expert, E, 5, 5)
    N = 20
    tokens = torch.randn(N, 5, 4, 4)
    probs = torch.rand(N, E).softmax(-1)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(k, dim=1).indices, True)
    if drops:
        keep[::5] = False  # dropped tokens: no expert at all
    weights = probs * keep
    ref = _run(dispatch_reference, bank, tokens, weights)
    fast = _run(dispatch_sparse, bank, tokens, weights)
    _assert_same(ref, fast)
    if drops:
        assert torch.equal(fast[0][::5], torch.zeros_like(fast[0][::5]))


def test_eval_mode_dense_equals_sparse_even_with_zero_weights():
    bank = build_expert_bank("residual", 4, 4, 4)
    with torch.no_grad():  # give BN non-trivial running statistics
        bank.train()
        bank(torch.randn(32, 4, 4, 4) * 3 + 1)
    bank.eval()
    tokens = torch.randn(10, 4, 4, 4)
    weights = torch.rand(10, 4) * (torch.rand(10, 4) > 0.5)
    torch.testing.assert_close(dispatch_fused(bank, tokens, weights), dispatch_sparse(bank, tokens, weights))


def test_dropped_tokens_do_not_change_kept_outputs():
    bank = build_expert_bank("residual", 3, 4, 4)
    bank.train()
    tokens = torch.randn(9, 4, 4, 4)
    weights = torch.rand(9, 3)
    weights[0] = 0  # token 0 dropped
    weights[1, 2] = 0  # expert 2 skips token 1
    a = dispatch_sparse(_clone_bank(bank), tokens, weights)
    tokens2 = tokens.clone()
    tokens2[0] = 100 * torch.randn(4, 4, 4)  # whatever a dropped token holds
    b = dispatch_sparse(_clone_bank(bank), tokens2, weights)
    torch.testing.assert_close(a[1:], b[1:])
    assert torch.equal(a[0], torch.zeros_like(a[0]))


def test_stacked_expert_matches_a_plain_residual_block():
    """Independent check: expert e of the bank equals a hand-built Conv-BN-ReLU-Conv-BN(+skip)-ReLU."""
    import torch.nn.functional as F

    bank = build_expert_bank("residual", 3, 4, 6).eval()
    x = torch.randn(2, 4, 5, 5)
    e = 1
    def bn(mod, h):
        s = slice(e * 6, (e + 1) * 6)
        return F.batch_norm(h, mod.running_mean[s], mod.running_var[s], mod.weight[s], mod.bias[s], False)
    h = F.relu(bn(bank.bn1, F.conv2d(x, bank.conv1.weight[e], padding=1)))
    h = bn(bank.bn2, F.conv2d(h, bank.conv2.weight[e], padding=1))
    s = bn(bank.skip_bn, F.conv2d(x, bank.skip.weight[e]))
    expected = F.relu(h + s)
    torch.testing.assert_close(bank.forward_one(x, e), expected)
    torch.testing.assert_close(bank.forward_all(x)[:, e], expected, atol=1e-5, rtol=1e-5)


def test_bad_weights_shape():
    bank = build_expert_bank("conv_bn_relu", 2, 3, 3)
    with pytest.raises(ValueError, match="weights must be"):
        dispatch_sparse(bank, torch.randn(4, 3, 2, 2), torch.rand(4, 3))
    with pytest.raises(ValueError, match="num_experts"):
        build_expert_bank("residual", 0, 3, 3)
    with pytest.raises(KeyError, match="unknown expert"):
        build_expert_bank("mlp", 2, 3, 3)


@pytest.mark.parametrize("expert_id", [0, 2])
def test_sparse_all_tokens_to_one_expert(expert_id):
    """Every token to one expert (the "shared" router's case): the no-copy path equals the reference."""
    bank = build_expert_bank("residual", 3, 5, 5)
    tokens = torch.randn(10, 5, 4, 4)
    weights = torch.zeros(10, 3)
    weights[:, expert_id] = torch.rand(10) + 0.5
    ref = _run(dispatch_reference, bank, tokens, weights)
    fast = _run(dispatch_sparse, bank, tokens, weights)
    _assert_same(ref, fast)


def test_upcycle_copies_parameters_statistics_and_optimizer_state():
    bank = build_expert_bank("residual", 3, 4, 6)  # 4 -> 6 channels: has a skip conv + BN
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    with bank.per_expert():
        bank.forward_one(torch.randn(5, 4, 3, 3), 0).square().mean().backward()  # only expert 0 gets gradients
    opt.step()
    bank.upcycle(0, opt)
    x = torch.randn(2, 4, 3, 3)
    bank.eval()
    for e in (1, 2):
        torch.testing.assert_close(bank.forward_one(x, e), bank.forward_one(x, 0), rtol=0, atol=0)
    for conv in (bank.conv1, bank.conv2, bank.skip):
        s0 = opt.state[conv.weights[0]]
        for e in (1, 2):
            se = opt.state[conv.weights[e]]
            assert torch.equal(se["exp_avg"], s0["exp_avg"]) and torch.equal(se["exp_avg_sq"], s0["exp_avg_sq"])
            assert se["exp_avg"] is not s0["exp_avg"]  # copies, not shared tensors
    for bn in (bank.bn1, bank.bn2, bank.skip_bn):
        m = opt.state[bn.weight]["exp_avg"].view(3, -1)
        assert m[0].abs().sum() > 0 and torch.equal(m[1], m[0]) and torch.equal(m[2], m[0])
    # without an optimizer the state is left alone
    bank2 = build_expert_bank("residual", 2, 4, 4)
    opt2 = torch.optim.AdamW(bank2.parameters())
    bank2.upcycle(0)
    assert not opt2.state



def test_captured_strategy_uses_the_router_capacity_factor(monkeypatch):
    """Under capture a sparse layer runs the capacity strategy sized by its router's capacity factor
    (``ceil(cf * N * k / E)``), not the masked-dense fallback of routers without one."""
    import math

    import pce.moe.execution as ex
    from pce.models.layer import PCELayer

    gate = PCELayer(8, 4, num_experts=4, router="gate", top_k=1, execution="sparse",
                    router_kwargs=dict(capacity_factor=1.25))
    cosine = PCELayer(8, 4, num_experts=4, top_k=1, execution="sparse")
    monkeypatch.setattr(ex, "is_capturing", lambda: True)
    strategy = gate.strategy.resolve(gate.router, torch.device("cpu"))
    assert isinstance(strategy, ex.CapacityExecution) and strategy.router is gate.router
    assert strategy.capacity(128, 4, strategy.router) == math.ceil(1.25 * 128 * 1 / 4) == 40
    fallback = cosine.strategy.resolve(cosine.router, torch.device("cpu"))
    assert fallback.capacity(128, 4, fallback.router) == 128  # no capacity factor: every token fits
