"""Cost-model dispatch: run a factorized layer through its factors or through a dense weight.

A factorized layer can compute ``y = x W^T`` two ways:

- ``"factorized"``: contract the input with the factors (the vec trick for Kronecker
  products, mode products for CP / Tucker). Few FLOPs when the rank is low, but several
  smaller GEMMs, each with a fixed overhead and a lower throughput than one large GEMM.
- ``"dense"``: materialise ``W`` from the factors, then one GEMM. ``batch * H_out * H_in``
  FLOPs plus the cost of forming ``W`` (about ``rank * H_out * H_in``), which a large batch
  amortises; the right choice when the rank is high.

A kernel describes each candidate (each path, and each way it can run a path) as a list of
operations for one call shape, forward plus the backward when a gradient is needed:
:class:`Gemm` (a GEMM or bmm, with what a blocked kernel keeps in cache), :class:`Pass` (a
memory-bound copy, permutation or reduction), :class:`Node` (built-in autograd nodes) and
:class:`PyFunction` (a Python ``autograd.Function``). :class:`CostModel` turns a list into
seconds (:func:`estimate`) and :func:`choose` takes the cheapest. The model is
deliberately simple: per op a fixed launch cost; a GEMM at the slower of its FLOP rate and
its memory traffic (small result tiles at a reduced rate); memory traffic at a streaming
rate, or a cache rate for small operands; results over the allocator's mmap threshold pay
for fresh pages; fixed costs per autograd node and per Python Function. It ranks paths,
it does not predict absolute times (on the development machine, within about 2x).

Constants: :data:`DEFAULT_MODELS` holds fixed constants measured once per device type
(see each entry); :func:`calibrate` measures the main ones on the running machine and
installs them for the process (plans cached before are then recomputed, see
:func:`plan_generation`). No timing runs implicitly: a measurement on a busy machine would
make the choice of path, and so the rounding of the results, vary from run to run.

Under ``torch.compile`` / ``torch.export`` the choice is plain Python on static sizes, so
it is folded into the graph. When the batch size is symbolic (a dynamic dimension), no
decision may depend on it (that would add a guard or violate an export constraint): the
kernels plan for :data:`SYMBOLIC_ROWS` rows instead (see :func:`static_rows`).

:func:`force_path` (a context manager) and the ``path=`` argument of the functional forms
override the choice, e.g. for tests or to pin a path in deployment.

Reuse (CP / Tucker kernels): describe each path with the op classes above, pick with
:func:`estimate` / :func:`choose` honouring :func:`forced_path`, plan with
:func:`static_rows` (``None`` when symbolic: use :data:`SYMBOLIC_ROWS`), and key any plan
cache on :func:`plan_generation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_MODELS",
    "KERNELS",
    "PATHS",
    "SYMBOLIC_ROWS",
    "CostModel",
    "Gemm",
    "Node",
    "Pass",
    "PyFunction",
    "calibrate",
    "call_needs",
    "check_path",
    "choose",
    "cost_model",
    "estimate",
    "force_kernel",
    "force_path",
    "forced_kernel",
    "forced_path",
    "plan_generation",
    "static_rows",
]

PATHS = ("factorized", "dense")

# The ways a dispatching kernel can run: its hand-written autograd.Function, the same
# forward's ops recorded by autograd (no Python autograd node: less fixed cost, autograd's
# backward), or the dense weight and one dense op.
KERNELS = ("function", "ops", "dense")

# Rows assumed when the batch size is symbolic (torch.export / compile with a dynamic
# batch): large enough that the dense path's one-off cost of forming W is amortised, as it
# is in the batched serving and training these exports are made for.
SYMBOLIC_ROWS = 1024


@dataclass(frozen=True)
class Gemm:
    """``batch`` matrix products ``(m, k) @ (k, n)`` (one op; ``batch > 1`` is a bmm).

    ``in_cached``: entries of the inputs that a blocked kernel just produced and still has
    in cache; ``out_cached``: the result is consumed from cache block by block (no trip to
    memory, no allocation of the whole result); ``efficiency``: the fraction of the modelled
    FLOP rate a class of GEMMs measurably reaches where the tile rule does not see why (e.g.
    a convolution's per-sample channel contractions on NCHW tensors: about half).
    """

    m: int
    n: int
    k: int
    batch: int = 1
    in_cached: int = 0
    out_cached: bool = False
    efficiency: float = 1.0


@dataclass(frozen=True)
class Pass:
    """One memory-bound op (copy, permutation, add, reduction) over ``elements`` entries."""

    elements: int


@dataclass(frozen=True)
class Node:
    """``count`` built-in autograd nodes (recorded in forward, run by the engine)."""

    count: int = 1


@dataclass(frozen=True)
class PyFunction:
    """One call of a Python ``torch.autograd.Function`` (its Python forward and, when
    ``backward``, its Python backward): the fixed cost of the hand-written kernels."""

    backward: bool = False


Op = Gemm | Pass | Node | PyFunction


@dataclass(frozen=True)
class CostModel:
    """Seconds of a list of operations on one device (float32 rates).

    Attributes:
        gemm_flops: sustained FLOP/s (2 per multiply-add) of a large GEMM.
        bytes_per_s: streaming bandwidth to memory, for operands and results.
        cache_bytes_per_s: bandwidth when an op's operands and result fit in
            ``cache_bytes`` (small tensors stay in cache).
        cache_bytes: see ``cache_bytes_per_s``.
        alloc_bytes_per_s: extra cost per byte of a result larger than ``alloc_bytes``
            (on CPU the allocator hands those out as fresh pages: page faults and zeroing
            by the kernel on every call); ``0`` for none.
        alloc_bytes: see ``alloc_bytes_per_s``.
        op_s: fixed cost of launching one op (Python + dispatcher, or a kernel launch).
        batch_item_s: extra cost per matrix of a batched GEMM (small-matrix inefficiency).
        node_s: fixed cost of one built-in autograd node (graph record + engine call).
        function_s: fixed cost of a Python ``autograd.Function`` forward (apply and its
            Python body); its backward costs as much again.

    A GEMM costs ``op_s + batch * batch_item_s + max(FLOPs / gemm_flops, bytes moved /
    bandwidth)`` (compute and traffic overlap), plus the allocation term of its result; a
    pass costs ``op_s`` plus reading and writing its elements, plus the allocation term.
    """

    gemm_flops: float
    bytes_per_s: float
    cache_bytes_per_s: float
    cache_bytes: int
    alloc_bytes_per_s: float
    alloc_bytes: int
    op_s: float
    batch_item_s: float
    node_s: float
    function_s: float

    def _traffic(self, nbytes: float) -> float:
        rate = self.cache_bytes_per_s if nbytes <= self.cache_bytes else self.bytes_per_s
        return nbytes / rate

    def _alloc(self, nbytes: float) -> float:
        if self.alloc_bytes_per_s <= 0 or nbytes <= self.alloc_bytes:
            return 0.0
        return nbytes / self.alloc_bytes_per_s

    def time(self, ops: Sequence[Op], itemsize: int = 4) -> float:
        """Estimated seconds of ``ops`` on tensors with ``itemsize`` bytes per entry."""
        # float64 GEMMs run at half the float32 rate; half precision is not assumed faster
        # (CPU GEMMs in bf16 are often not), only lighter on memory.
        flops = self.gemm_flops * (0.5 if itemsize >= 8 else 1.0)
        total = 0.0
        for op in ops:
            if isinstance(op, Gemm):
                out = itemsize * op.batch * op.m * op.n
                ins = itemsize * op.batch * (op.m * op.k + op.k * op.n)
                cached = itemsize * op.in_cached + (out if op.out_cached else 0)
                moved = ins + out - cached
                # A side under 64 (a small result tile or a short contraction) leaves
                # the GEMM micro-kernels under-used: about sqrt(side / 64) of the
                # large-GEMM rate on the development machine.
                tile = min(op.m, op.n, op.k)
                eff = op.efficiency * (1.0 if tile >= 64 else max(tile, 1) ** 0.5 / 8.0)
                compute = 2.0 * op.m * op.n * op.k * op.batch / (flops * eff)
                traffic = self._traffic(moved) + cached / self.cache_bytes_per_s
                total += (
                    self.op_s
                    + op.batch * self.batch_item_s
                    + max(compute, traffic)
                    + (0.0 if op.out_cached else self._alloc(out))
                )
            elif isinstance(op, Pass):
                out = itemsize * op.elements
                total += self.op_s + self._traffic(2 * out) + self._alloc(out)
            elif isinstance(op, Node):
                total += op.count * self.node_s
            else:
                total += self.function_s * (2 if op.backward else 1)
        return total


# CPU: measured on the development machine (Xeon, AVX-512, one thread, as
# torch.utils.benchmark times it; torch 2.13, MKL) and rounded: a large float32 mm runs
# at ~150 GFLOP/s; ~10 GB/s to memory, ~40 GB/s within 1 MiB; results over 32 MiB
# (glibc's largest mmap threshold) cost another ~4 GB/s of page faults; ~2 us to launch
# a small op; ~0.1 us per matrix of a bmm; ~2.5 us per built-in autograd node (record +
# backward); ~25 us each way for a Python autograd.Function (apply, setup_context, the
# Python bodies). The machine was shared while measuring, so these are ratios more than
# absolute figures; calibrate() measures the main ones on the running machine. CUDA: round
# figures of a data-centre GPU (kernel launches dominate small problems, the caching
# allocator makes allocations free); run calibrate("cuda") to replace them.
DEFAULT_MODELS: dict[str, CostModel] = {
    "cpu": CostModel(
        gemm_flops=150e9,
        bytes_per_s=10e9,
        cache_bytes_per_s=40e9,
        cache_bytes=1 << 20,
        alloc_bytes_per_s=4e9,
        alloc_bytes=32 << 20,
        op_s=2e-6,
        batch_item_s=0.1e-6,
        node_s=2.5e-6,
        function_s=25e-6,
    ),
    "cuda": CostModel(
        gemm_flops=20e12,
        bytes_per_s=1.0e12,
        cache_bytes_per_s=1.0e12,
        cache_bytes=0,
        alloc_bytes_per_s=0.0,
        alloc_bytes=0,
        op_s=8e-6,
        batch_item_s=0.0,
        node_s=10e-6,
        function_s=30e-6,
    ),
}

_MODELS: dict[str, CostModel] = dict(DEFAULT_MODELS)


def cost_model(device_type: str) -> CostModel:
    """The model in use for ``device_type`` (CPU's for unknown host types, CUDA's for other
    accelerators)."""
    model = _MODELS.get(device_type)
    if model is None:
        model = _MODELS["cpu"] if device_type in ("cpu", "meta") else _MODELS["cuda"]
    return model


class _State:
    forced: str | None = None
    forced_kernel: str | None = None
    generation: int = 0  # bumped whenever the models change, to invalidate plan caches


_STATE = _State()


def forced_path() -> str | None:
    """The path pinned by :func:`force_path`, or ``None``."""
    return _STATE.forced


def plan_generation() -> int:
    """Changes whenever :func:`calibrate` installs new constants (a plan-cache key)."""
    return _STATE.generation


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Within the block every dispatching kernel takes ``path`` (``"factorized"`` or
    ``"dense"``); ``None`` restores the automatic choice. Process-wide, not thread-local."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    previous = _STATE.forced
    _STATE.forced = path
    try:
        yield
    finally:
        _STATE.forced = previous


def forced_kernel() -> str | None:
    """The kernel pinned by :func:`force_kernel`, or ``None``."""
    return _STATE.forced_kernel


@contextlib.contextmanager
def force_kernel(kernel: str | None) -> Iterator[None]:
    """Within the block the kernels that offer a choice of implementation (see
    :data:`KERNELS`) run ``kernel``: ``"function"`` (the hand-written
    ``torch.autograd.Function``), ``"ops"`` (its forward's ops, differentiated by autograd) or
    ``"dense"`` (the dense weight, one dense op); ``None`` restores the automatic choice. It
    takes precedence over :func:`force_path` (``"dense"`` is the dense path); a ``path=``
    argument takes precedence over both. For tests and measurements; process-wide."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    previous = _STATE.forced_kernel
    _STATE.forced_kernel = kernel
    try:
        yield
    finally:
        _STATE.forced_kernel = previous


def choose(candidates: Mapping[str, Sequence[Op]], itemsize: int, device_type: str) -> str:
    """The cheapest candidate path under the model of ``device_type`` (ties: the first)."""
    model = cost_model(device_type)
    best, best_time = "", 0.0
    for name, ops in candidates.items():
        t = model.time(ops, itemsize)
        if best == "" or t < best_time:
            best, best_time = name, t
    return best


def estimate(
    candidates: Mapping[str, Sequence[Op]], itemsize: int, device_type: str
) -> dict[str, float]:
    """Estimated seconds of every candidate path."""
    model = cost_model(device_type)
    return {name: model.time(ops, itemsize) for name, ops in candidates.items()}


def static_rows(shape: Sequence[object]) -> int | None:
    """The number of rows ``prod(shape[:-1])`` when every leading size is a plain int,
    ``None`` when one is symbolic (``torch.SymInt`` under a dynamic-shape trace)."""
    rows = 1
    for s in shape[:-1]:
        if not isinstance(s, int):
            return None
        rows *= s
    return rows


def call_needs(
    input: torch.Tensor, factors: Sequence[torch.Tensor], bias: torch.Tensor | None
) -> tuple[bool, bool, bool]:
    """Which gradients a call computes: ``(input, any factor, bias)`` (all ``False`` with
    grad mode off); the backward a path is costed for."""
    if not torch.is_grad_enabled():
        return (False, False, False)
    return (
        input.requires_grad,
        any(f.requires_grad for f in factors),
        bias is not None and bias.requires_grad,
    )


def check_path(path: object) -> str | None:
    """Validate a ``path=`` argument: ``None`` (automatic) or one of :data:`PATHS`."""
    if path is None:
        return None
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or None, got {type(path).__name__}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    return path


def _best_time(fn, repeat: int = 9, number: int = 5) -> float:
    # The fastest of several repetitions: on a shared machine the others measure the
    # neighbours too.
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return min(samples)


def calibrate(device: str | torch.device = "cpu", *, install: bool = True) -> CostModel:
    """Measure the :class:`CostModel` constants on ``device`` (a second or two).

    Times a large float32 mm (GEMM rate), a large copy (bandwidth), a tiny mm (per-op
    overhead), a bmm of many tiny matrices (per-matrix overhead) and a tiny custom autograd
    node (per-node overhead), with the current ``torch.get_num_threads()``. With
    ``install`` the model replaces the one in use for the device type for this process
    and every cached plan is recomputed. The fastest of several repetitions; on a busy
    machine the figures are still noisy, so prefer calibrating on a quiet one.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        def run() -> None:
            fn()
            sync()

        return _best_time(run)

    n = 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    gemm_flops = 2 * n**3 / timed(lambda: torch.mm(a, b))
    big = torch.randn(1 << 22, device=device)
    dst = torch.empty_like(big)
    bytes_per_s = 2 * 4 * big.numel() / timed(lambda: dst.copy_(big))
    small = torch.randn(4, 4, device=device)
    op_s = timed(lambda: torch.mm(small, small))
    many = torch.randn(4096, 4, 4, device=device)
    batch_item_s = max(0.0, (timed(lambda: torch.bmm(many, many)) - op_s) / many.shape[0])
    leaf = torch.randn(4, device=device, requires_grad=True)

    class _Id(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

    def base() -> None:
        leaf.sum().backward()

    def builtin() -> None:
        leaf.mul(2).sum().backward()

    def python() -> None:
        _Id.apply(leaf).sum().backward()

    t_base = timed(base)
    node_s = max(0.0, timed(builtin) - t_base - op_s)
    function_s = max(0.0, (timed(python) - t_base - op_s) / 2)
    model = dataclasses.replace(
        cost_model(device.type),
        gemm_flops=gemm_flops,
        bytes_per_s=bytes_per_s,
        op_s=op_s,
        batch_item_s=batch_item_s,
        node_s=node_s,
        function_s=function_s,
    )
    if install:
        _MODELS[device.type] = model
        _STATE.generation += 1
    return model
