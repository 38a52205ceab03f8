"""Issue #24, graph-capture defects 1-4: what the README promises as capture paths holds for the models that broke it.

1. ONNX export of a router with a capacity factor (``gate``'s default 1.25): the capacity mask has an ONNX form
   (no ``aten.sort.stable``) and gives exactly the stable-sort mask, ties included.
2. A dynamic batch (``torch.export`` with a batch ``Dim``, ONNX from it) with capacity routers: no guard on the
   capacity, outputs equal to eager at other batch sizes.
3. ``torch.jit.trace`` with its default ``check_trace`` on a freshly built model (the positional-map cache is not
   filled while tracing, so both check invocations trace the same graph).
4. ``torch.jit.script`` of a dense twin refuses as clearly as a PCE model (a ``RuntimeError`` naming
   ``torch.jit.script``), which is what smp's ``_is_torch_scriptable = False`` promises.
"""
import math

import pytest
import torch

from pce.models.classifier import build_classifier
from pce.models.presets import build_backbone
from pce.moe.routing import capacity_mask


def _stable_reference(assigned, priority, capacity):
    """The capacity mask as it was computed before issue #24 (a stable descending argsort): the reference."""
    score = torch.where(assigned, priority, torch.full_like(priority, -math.inf))
    order = score.argsort(dim=0, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(order.shape[0]).unsqueeze(1).expand_as(order))
    return assigned & (rank < capacity)


def _tied_inputs(seed, n, e, levels):
    """``assigned [n, e]`` and priorities drawn from ``levels`` values (many ties), plus some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    assigned = torch.rand(n, e, generator=g) < 0.6
    priority = torch.randint(0, levels, (n, e), generator=g).float() / levels
    return assigned, priority


class _Mask(torch.nn.Module):
    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity

    def forward(self, assigned, priority):
        return capacity_mask(assigned, priority, self.capacity)


# -- 1. ONNX with capacity routing -------------------------------------------------------------------------------
def test_capacity_mask_equals_stable_order_with_ties():
    """The mask keeps, per expert, the ``capacity`` assigned tokens of highest priority, ties to the lower index:
    identical to the stable argsort on random inputs full of ties (uniform priorities included)."""
    for seed in range(40):
        n, e = 1 + seed % 23, 1 + seed % 5
        assigned, priority = _tied_inputs(seed, n, e, levels=1 + seed % 4)
        for capacity in (0, 1, 2, max(1, n // 3), n, n + 1):
            assert torch.equal(capacity_mask(assigned, priority, capacity),
                               _stable_reference(assigned, priority, capacity)), (seed, capacity)
    ones = torch.ones(9, 3, dtype=torch.bool)
    uniform = torch.full((9, 3), 1 / 3)
    assert capacity_mask(ones, uniform, 4)[:, 0].tolist() == [True] * 4 + [False] * 5  # first tokens kept


def test_capacity_mask_has_an_onnx_form_equal_to_eager(tmp_path):
    """The graph holds no stable sort (no ONNX decomposition), and the ONNX mask equals the stable-sort mask."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assigned, priority = _tied_inputs(0, 24, 4, levels=3)
    ep = torch.export.export(_Mask(5), (assigned, priority))
    assert "sort.stable" not in str(ep.graph)
    path = tmp_path / "mask.onnx"
    torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for seed in range(5):
        a, p = _tied_inputs(seed, 24, 4, levels=1 + seed)
        got = sess.run(None, dict(zip(names, (a.numpy(), p.numpy()))))[0]
        assert torch.equal(torch.from_numpy(got), _stable_reference(a, p, 5)), seed


def _two_inputs(batch=2, size=64):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)]


def test_gate_router_onnx_round_trip(tmp_path):
    """``gate`` routing (capacity factor 1.25) exports to ONNX and gives the eager maps on two inputs."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    m = build_backbone("pce_tiny", router="gate", num_experts=4, top_k=1).eval()
    assert all(layer.router.capacity_factor == 1.25 for layer in m.pce_layers())
    xs = _two_inputs()
    path = tmp_path / "gate.onnx"
    torch.onnx.export(m, (xs[0],), str(path), dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    with torch.no_grad():
        for x in xs:
            eager = list(m(x).values())
            got = sess.run(None, {name: x.numpy()})
            assert len(got) == len(eager)
            for g, e in zip(got, eager):
                assert abs(g - e.numpy()).max() < 1e-4


# -- 2. dynamic batch with capacity routing ----------------------------------------------------------------------
@pytest.mark.parametrize("router", ["gate", "expert_choice"])
def test_dynamic_batch_export_with_capacity_routing(router):
    """torch.export with a batch ``Dim`` captures capacity routing (``ceil(cf N k / E)`` with ``N`` symbolic); the
    program, captured at batch 2, gives the eager maps at batches 1 and 5 (a 64 x 64 input: the last stage has one
    patch, so at batch 1 the capacity reaches ``N``)."""
    torch.manual_seed(0)
    m = build_backbone("pce_tiny", router=router, num_experts=4, top_k=1).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(m, (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        for b in (1, 5):
            x = torch.randn(b, 3, 64, 64)
            got, eager = ep.module()(x), m(x)
            for k in eager:
                assert got[k].shape == eager[k].shape and (got[k] - eager[k]).abs().max() < 1e-5, (b, k)


class _Capacity(torch.nn.Module):
    """``dispatch_capacity`` with the capacity of a top-1 router of capacity factor 1 over ``N`` tokens."""

    def __init__(self, bank):
        super().__init__()
        self.bank = bank

    def forward(self, tokens, weights):
        from pce.moe.dispatch import dispatch_capacity
        from pce.moe.routing import expert_capacity

        n, e = weights.shape
        return dispatch_capacity(self.bank, tokens, weights, expert_capacity(n, 1.0, 1, e))


def test_dynamic_token_count_capacity_dispatch_drops_as_eager():
    """The static capacity dispatch with a symbolic token count: captured once, it drops the assignments beyond
    each expert's capacity exactly as the eager buffers do (weights dense on purpose: every expert overflows)."""
    from pce.moe.experts import build_expert_bank

    torch.manual_seed(0)
    m = _Capacity(build_expert_bank("residual", 3, 4, 4).eval())
    n = torch.export.Dim("n", min=1, max=256)
    with torch.no_grad():
        ep = torch.export.export(m, (torch.randn(8, 4, 3, 3), torch.rand(8, 3)), dynamic_shapes=({0: n}, {0: n}))
        for count in (1, 2, 5, 13):
            tokens, weights = torch.randn(count, 4, 3, 3), torch.rand(count, 3)
            assert (ep.module()(tokens, weights) - m(tokens, weights)).abs().max() < 1e-5, count


def test_dynamic_batch_onnx_with_capacity_routing(tmp_path):
    """What ``tools/export.py --format onnx --dynamic-batch`` does with a ``gate`` backbone: the dynamic-batch
    program converted to ONNX runs at batches 1 and 5 with the eager maps."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    m = build_backbone("pce_tiny", router="gate", num_experts=4, top_k=1).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(m, (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    path = tmp_path / "gate_dynamic.onnx"
    torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    with torch.no_grad():
        for b in (1, 5):
            x = torch.randn(b, 3, 64, 64)
            for g, e in zip(sess.run(None, {name: x.numpy()}), m(x).values()):
                assert g.shape == tuple(e.shape) and abs(g - e.numpy()).max() < 1e-4, b


# -- 3. torch.jit.trace with its default checks on a fresh model -------------------------------------------------
def test_jit_trace_default_check_on_a_fresh_model():
    """``torch.jit.trace(model, x)`` (``check_trace=True``: the function is traced twice and the graphs compared)
    works on a freshly built model, whose positional-map cache is empty, and keeps eager results."""
    torch.manual_seed(0)
    m = build_classifier("pce_fmnist", 10).eval()
    xs = [torch.randn(2, 1, 28, 28), torch.rand(2, 1, 28, 28) * 4 - 1]
    with torch.no_grad():
        tr = torch.jit.trace(m, (xs[0],))
        for x in xs:
            assert (tr(x) - m(x)).abs().max() < 1e-5


def test_jit_trace_default_check_on_a_fresh_backbone():
    """The same on a fresh ``pce_tiny`` backbone (dict outputs: ``strict=False``) with the cosine router."""
    torch.manual_seed(0)
    m = build_backbone("pce_tiny").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        tr = torch.jit.trace(m, (x,), strict=False)
        got, eager = tr(x), m(x)
    assert all((got[k] - eager[k]).abs().max() < 1e-5 for k in eager)


# -- 4. torch.jit.script of dense twins ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dense_tiny", "pce_tiny"])
def test_jit_script_refuses_dense_twins_clearly(name):
    with pytest.raises(RuntimeError, match=r"cannot be compiled with torch\.jit\.script.*torch\.export"):
        torch.jit.script(build_backbone(name))


def test_dense_layer_and_expert_bank_refuse_script():
    from pce.models.layer import DenseLayer
    from pce.moe.experts import build_expert_bank

    for module in (DenseLayer(8), build_expert_bank("residual", 2, 8, 8)):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script"):
            torch.jit.script(module)


def test_smp_dense_encoder_scriptable_flag_holds():
    """smp's contract (tests/encoders/base.py ``test_torch_script``): an encoder with ``_is_torch_scriptable =
    False`` makes ``torch.jit.script`` raise a ``RuntimeError``; a ``NotSupportedError`` is not one."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    import pce.tasks.segmentation  # noqa: F401  registers the PCE encoders with smp

    enc = smp.encoders.get_encoder("dense_tiny", in_channels=3, depth=5, weights=None).eval()
    assert not enc._is_torch_scriptable
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script"):
        torch.jit.script(enc)
