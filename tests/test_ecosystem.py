"""The layers inside the rest of the PyTorch stack: autocast, torch.compile, torch.func,
double backward and serialization."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from kronlayers import CPConv2d, CPLinear, KroneckerLinear, compress
from kronlayers.functional import cp_conv2d, cp_linear, kronecker_linear
from kronlayers.functional._amp import apply_autocast
from kronlayers.functional._dispatch import force_path

F64 = torch.float64
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def mixed_model(dtype=torch.float32, device="cpu"):
    """Every layer type: CP conv, Kronecker rank 1 (matmul path), rank 2 with three factors,
    and a CP linear. Input ``(N, 2, 4, 4)``, output ``(N, 8)``."""
    return nn.Sequential(
        CPConv2d(2, 4, 3, padding=1, rank=3),
        nn.Flatten(),
        KroneckerLinear(64, 24, rank=1, in_shape=(8, 8), out_shape=(4, 6)),
        nn.GELU(),
        KroneckerLinear(24, 24, rank=2, in_shape=(2, 3, 4), out_shape=(3, 2, 4)),
        nn.Tanh(),
        CPLinear(24, 8, rank=3),
    ).to(dtype=dtype, device=device)


def forward_backward(model, x, grad_out):
    """Output and the gradients of every parameter and of the input."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(grad_out.to(y.dtype))
    return y, [p.grad for p in model.parameters()] + [x.grad]


# --- automatic mixed precision ---------------------------------------------------------------


def check_autocast(model, x, device_type, dtype, tol):
    grad_out = torch.randn(x.shape[0], 8, device=x.device)
    y_ref, grads_ref = forward_backward(model, x, grad_out)
    with torch.autocast(device_type, dtype=dtype):
        y, grads = forward_backward(model, x, grad_out)
    assert y.dtype == dtype
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, **tol)
    torch.testing.assert_close(y.float(), y_ref, **tol)


def test_autocast_cpu_bfloat16():
    model = mixed_model()
    check_autocast(model, torch.randn(6, 2, 4, 4), "cpu", torch.bfloat16, dict(rtol=0.1, atol=0.05))


@requires_cuda
def test_autocast_cuda_float16():
    model = mixed_model(device="cuda")
    x = torch.randn(6, 2, 4, 4, device="cuda")
    check_autocast(model, x, "cuda", torch.float16, dict(rtol=2e-2, atol=1e-2))


@pytest.mark.parametrize("layer", ["kronecker", "cp"])
def test_autocast_low_precision_input_meets_fp32_factors(layer):
    dense_in, dense_out = nn.Linear(10, 24), nn.Linear(12, 3)
    mid = KroneckerLinear(24, 12, rank=2) if layer == "kronecker" else CPLinear(24, 12, rank=3)
    model = nn.Sequential(dense_in, mid, dense_out)
    x = torch.randn(5, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        assert h.dtype == torch.bfloat16
        y = model[2](model[1](h))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_autocast_functional_forms():
    x = torch.randn(3, 24)
    kron = [torch.randn(1, 3, 4), torch.randn(1, 5, 6)]
    ins, outs = [torch.randn(4, 2), torch.randn(6, 2)], [torch.randn(3, 2), torch.randn(5, 2)]
    xc = torch.randn(2, 3, 5, 5)
    conv_in, conv_out = [torch.randn(3, 2)], [torch.randn(4, 2)]
    ks = (torch.randn(3, 2), torch.randn(3, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kronecker_linear(x, kron).dtype == torch.bfloat16
        assert cp_linear(x, ins, outs).dtype == torch.bfloat16
        assert cp_conv2d(xc, conv_in, conv_out, ks, padding=1).dtype == torch.bfloat16


def test_autocast_leaves_float64_and_disabled_regions_alone():
    layer = KroneckerLinear(12, 6, dtype=F64)
    x = torch.randn(3, 12, dtype=F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == F64
        with torch.autocast("cpu", enabled=False):
            assert KroneckerLinear(12, 6)(x.float()).dtype == torch.float32


def _float64_mixed_calls():
    x, xc = torch.randn(3, 24), torch.randn(2, 3, 5, 5)
    kron = [torch.randn(1, 3, 4), torch.randn(1, 5, 6)]
    ins, outs = [torch.randn(4, 2), torch.randn(6, 2)], [torch.randn(3, 2), torch.randn(5, 2)]
    conv_in, conv_out = [torch.randn(3, 2)], [torch.randn(4, 2)]
    ks = (torch.randn(3, 2), torch.randn(3, 2))
    return {
        "kronecker_factor": (
            lambda: kronecker_linear(x, [kron[0].double(), kron[1]]),
            r"factors\[0\]",
        ),
        "kronecker_input": (lambda: kronecker_linear(x.double(), kron), r"factors\[0\]"),
        "kronecker_bias": (
            lambda: kronecker_linear(x, kron, torch.randn(15, dtype=F64)),
            "bias",
        ),
        "cp_linear_factor": (
            lambda: cp_linear(x, ins, [outs[0], outs[1].double()]),
            r"out_factors\[1\]",
        ),
        "cp_conv2d_factor": (
            lambda: cp_conv2d(xc, conv_in, conv_out, (ks[0].double(), ks[1]), padding=1),
            r"kernel_factors\[0\]",
        ),
    }


@pytest.mark.parametrize("case", list(_float64_mixed_calls()))
def test_autocast_float64_mixed_with_other_dtypes_is_a_type_error(case):
    # Under autocast the dtype check is skipped because the arguments are cast to one dtype,
    # but autocast leaves float64 alone (like torch.amp.custom_fwd), so a float64 argument
    # next to float32 ones still meets a mismatch: it must be the TypeError naming the
    # argument that the same call raises outside autocast.
    call, name = _float64_mixed_calls()[case]
    with pytest.raises(TypeError, match=name):
        call()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=name):
        call()


def test_no_grad_calls_skip_the_autograd_function():
    layer = KroneckerLinear(24, 15, rank=2)
    x = torch.randn(3, 24)
    for path in ("factorized", "dense"):
        layer.requires_grad_(True)
        with force_path(path):
            y = layer(x)
            assert y.grad_fn is not None
            with torch.no_grad():
                y_inference = layer(x)
            assert y_inference.grad_fn is None
            torch.testing.assert_close(y_inference, y, rtol=1e-6, atol=1e-6)
            layer.requires_grad_(False)
            assert layer(x).grad_fn is None
            assert layer(x.clone().requires_grad_()).grad_fn is not None


def test_apply_autocast_passes_non_tensors_through():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(x, factor, ids):
            return x * factor + ids.to(x.dtype)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.factor = inputs[1]

        @staticmethod
        def backward(ctx, g):
            return g * ctx.factor, None, None

    x = torch.randn(4, requires_grad=True)
    ids = torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = apply_autocast(Scale, x, 2.0, ids)
    assert y.dtype == torch.bfloat16 and ids.dtype == torch.long
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, torch.full((4,), 2.0))
    assert apply_autocast(Scale, x, 2.0, ids).dtype == torch.float32

    class OldStyle(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    with pytest.raises(TypeError, match="must define setup_context"):
        apply_autocast(OldStyle, x)


# --- torch.compile ---------------------------------------------------------------------------


def check_compiled(model, x, inference=False, **compile_kwargs):
    y_ref = model(x)
    grad_out = torch.randn_like(y_ref)
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    y_ref, grads_ref = forward_backward(model, x, grad_out)
    y, grads = forward_backward(compiled, x, grad_out)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **tol)
    if inference:  # compiled again for grad mode off (Dynamo guards on it)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), y_ref, **tol)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: KroneckerLinear(24, 8, rank=3, in_shape=(4, 6), out_shape=(2, 4)), (6, 24)),
        (lambda: CPLinear(24, 8, rank=3), (6, 24)),
        (lambda: CPConv2d(3, 4, 3, stride=2, padding=1, rank=2), (2, 3, 6, 6)),
    ],
    ids=["KroneckerLinear", "CPLinear", "CPConv2d"],
)
def test_compile_layer_aot_eager(layer, shape):
    check_compiled(layer(), torch.randn(shape), backend="aot_eager")


def test_compile_model_aot_eager():
    check_compiled(mixed_model(), torch.randn(5, 2, 4, 4), inference=True, backend="aot_eager")


def test_compile_model_inductor():
    model = nn.Sequential(KroneckerLinear(16, 12, rank=2), nn.ReLU(), KroneckerLinear(12, 8))
    check_compiled(model, torch.randn(4, 16))


def test_compile_under_autocast():
    model = mixed_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(4, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
        y_ref = model(x)
    assert y.dtype == torch.bfloat16
    # A compiled graph is planned for SYMBOLIC_ROWS rows (one graph for every batch size), so
    # a layer may take another kernel than in eager mode at batch 4 (e.g. factorized instead
    # of dense): the same function, rounded differently in bfloat16 (~3 significant digits).
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)


@requires_cuda
def test_compile_cuda_inductor():
    check_compiled(mixed_model(device="cuda"), torch.randn(6, 2, 4, 4, device="cuda"))


# --- torch.func ------------------------------------------------------------------------------


def test_functional_call_and_func_grad():
    model = mixed_model(F64)
    x = torch.randn(5, 2, 4, 4, dtype=F64)
    params = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    other = copy.deepcopy(model)
    other.load_state_dict(params)
    y = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(y, other(x), rtol=1e-12, atol=1e-12)

    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    other(x).sum().backward()
    for name, p in other.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)


def test_vmap_over_inputs_and_factors():
    a = torch.randn(2, 3, 4, dtype=F64)
    b = torch.randn(2, 5, 6, dtype=F64)
    bias = torch.randn(15, dtype=F64)
    xs = torch.randn(7, 3, 24, dtype=F64)
    out = torch.func.vmap(lambda x: kronecker_linear(x, [a, b], bias))(xs)
    torch.testing.assert_close(out, kronecker_linear(xs, [a, b], bias), rtol=1e-12, atol=1e-12)
    a_batch = torch.randn(4, 2, 3, 4, dtype=F64)
    out = torch.func.vmap(lambda f: kronecker_linear(xs[0], [f, b], bias))(a_batch)
    expected = torch.stack([kronecker_linear(xs[0], [f, b], bias) for f in a_batch])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_per_sample_gradients_with_vmap_of_grad():
    model = KroneckerLinear(24, 15, rank=2, dtype=F64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ts = torch.randn(6, 24, dtype=F64), torch.randn(6, 15, dtype=F64)

    def loss(p, x, t):
        y = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return ((y - t) ** 2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, ts)
    for i in range(6):
        model.zero_grad()
        ((model(xs[i : i + 1]) - ts[i]) ** 2).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [(lambda: CPLinear(12, 6, rank=2), (4, 12)), (lambda: CPConv2d(2, 3, 3, rank=2), (2, 2, 5, 5))],
    ids=["CPLinear", "CPConv2d"],
)
def test_cp_vmap_works_or_raises_clearly(layer, shape):
    layer = layer().double()
    xs = torch.randn(3, *shape, dtype=F64)
    try:
        out = torch.func.vmap(layer)(xs)
    except RuntimeError as e:  # no vmap rule: PyTorch's error names vmap and the fix
        assert "vmap" in str(e)
        return
    torch.testing.assert_close(out, torch.stack([layer(x) for x in xs]), rtol=1e-10, atol=1e-12)


def test_jacrev_and_jacfwd_work_on_every_path():
    layer = KroneckerLinear(12, 6, rank=2, dtype=F64)
    x = torch.randn(12, dtype=F64)
    jac = torch.func.jacrev(layer)(x)
    torch.testing.assert_close(jac, layer.weight.detach(), rtol=1e-12, atol=1e-12)
    # Under functorch transforms every path runs plain ops (the hand-written Function has
    # no jvp), so forward mode works on each.
    for path in ("factorized", "dense"):
        with force_path(path):
            jac = torch.func.jacfwd(layer)(x)
        torch.testing.assert_close(jac, layer.weight.detach(), rtol=1e-12, atol=1e-12)


# --- double backward -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank"),
    [((3, 4), (2, 5), 1), ((3, 4), (2, 5), 2), ((2, 3, 2), (2, 1, 3), 2)],
)
def test_kronecker_gradgradcheck(in_shape, out_shape, rank):
    factors = [
        torch.randn(rank, o, i, dtype=F64, requires_grad=True)
        for o, i in zip(out_shape, in_shape, strict=True)
    ]
    n_in = torch.tensor(in_shape).prod().item()
    n_out = torch.tensor(out_shape).prod().item()
    x = torch.randn(3, n_in, dtype=F64, requires_grad=True)
    bias = torch.randn(n_out, dtype=F64, requires_grad=True)

    def fn(x, bias, *fs):
        return kronecker_linear(x, list(fs), bias)

    assert gradcheck(fn, (x, bias, *factors))
    assert gradgradcheck(fn, (x, bias, *factors))


def test_kronecker_gradient_penalty_matches_dense():
    layer = KroneckerLinear(12, 6, rank=2, dtype=F64)
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).tanh().sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    w = layer.weight.detach().requires_grad_(True)
    x2 = x.detach().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, w, layer.bias.detach())
    (gx2,) = torch.autograd.grad(y2.tanh().sum(), x2, create_graph=True)
    gx2.pow(2).sum().backward()
    # d/dW of the penalty, mapped to the factors by the chain rule through W = kron sum.
    (expected,) = torch.autograd.grad(layer.weight, layer.factors[0], w.grad)
    torch.testing.assert_close(layer.factors[0].grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [(lambda: CPLinear(12, 6, rank=2), (4, 12)), (lambda: CPConv2d(2, 3, 3, rank=2), (2, 2, 5, 5))],
    ids=["CPLinear", "CPConv2d"],
)
def test_cp_double_backward_works_or_raises_clearly(layer, shape):
    layer = layer().double()
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    try:
        gx.sum().backward()
    except RuntimeError as e:
        assert "once_differentiable" in str(e)
        return
    assert gradgradcheck(lambda x: layer(x), (x,))


# --- serialization ---------------------------------------------------------------------------


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    ("make", "shape", "keys"),
    [
        (lambda: KroneckerLinear(24, 15, rank=2), (3, 24), {"factors.0", "factors.1", "bias"}),
        (
            lambda: CPLinear(24, 15, rank=2),
            (3, 24),
            {"in_factors.0", "in_factors.1", "out_factors.0", "out_factors.1", "bias"},
        ),
        (
            lambda: CPConv2d(3, 4, 3, rank=2),
            (2, 3, 5, 5),
            {"in_factors.0", "out_factors.0", "kh_factor", "kw_factor", "bias"},
        ),
    ],
    ids=["KroneckerLinear", "CPLinear", "CPConv2d"],
)
def test_state_dict_round_trip_to_fresh_layer(make, shape, keys):
    layer, fresh = make(), make()
    state = save_load(layer.state_dict())
    assert set(state) == keys
    fresh.load_state_dict(state)
    x = torch.randn(shape)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_model_checkpoint_round_trip(tmp_path):
    model = mixed_model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = mixed_model()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(4, 2, 4, 4)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_compressed_model_checkpoint_round_trip():
    dense = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))
    model, _ = compress(dense, rank=2, inplace=False)
    fresh, _ = compress(nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)), rank=2)
    fresh.load_state_dict(save_load(model.state_dict()))
    x = torch.randn(4, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "other"),
    [
        (lambda: KroneckerLinear(24, 15, rank=2), lambda: KroneckerLinear(24, 15, rank=1)),
        (
            lambda: KroneckerLinear(24, 15, rank=2),
            lambda: KroneckerLinear(24, 15, rank=2, in_shape=(2, 12), out_shape=(3, 5)),
        ),
        (lambda: CPLinear(24, 15, rank=2), lambda: CPLinear(24, 15, rank=3)),
        (lambda: CPConv2d(3, 4, 3, rank=2), lambda: CPConv2d(3, 4, 3, rank=1)),
    ],
    ids=["kron-rank", "kron-split", "cp-linear-rank", "cp-conv-rank"],
)
def test_mismatched_factor_shapes_give_size_mismatch(make, other):
    state = save_load(make().state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        other().load_state_dict(state)
