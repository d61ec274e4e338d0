"""torch.compile: every layer of the zoo compiles and computes its eager result, and the paper's
model's training step compiles on the CPU.

Compile time is the cost of these tests (an inductor compile of even one small layer takes about a
minute on this project's 2-core machines, against seconds for the rest of a layer's contract). So
the sweep over every registry entry and variant compiles the training forward and backward with
``backend="aot_eager"`` (dynamo's graph capture and AOT autograd's functionalised forward and
backward graphs, run without generating code) and the inverse and eval-mode forward with dynamo's
capture alone (``"eager"``: what differs there is Python, the eval cache and the inverse's
factors). Inductor itself compiles the fused matrix-exponential coupling at two batch sizes (the
second turns shapes dynamic: where inductor failed with "Expected !size_bytes_is_heap_allocated_",
on the per-thread scratch buffers that tracing the series had cached; aot_eager never failed
there) and a training step of the paper's model (its smoke-sized configuration: every layer kind of
the paper's model, few steps). Those two, the training run and the bench row are marked slow
(about a minute each here).

Every compile starts from ``torch._dynamo.reset()`` and records the graphs it captured: a test
whose compiled function silently fell back to eager would compare eager with eager, so each test
also asserts that its graphs hold the layer's operations.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

import mefbench.layers as L
from mefbench.layers.nets import sync_init_flags
from mefbench.models import FlowConfig, MultiScaleFlow
from mefbench.training import compiled_loss, train_step

SHAPE = (12, 8, 8)  # C, H, W: the paper's first level in channels; small in pixels
BATCH = 3
NET = {"net": L.net_factory(hidden_channels=8, num_blocks=1)}
# float64 (the tests' default): a compiled graph reorders and fuses operations, so its result
# differs from eager by rounding only; 1e-9 relative is a thousand times float64's rounding of a
# few hundred operations, and a million times below any error of the maths
RTOL = ATOL = 1e-9
# inverses compiled in the sweep: closed forms, solves and norm-planned series. A sequential
# (wavefront) or iterative (bisection) inverse unrolls into hundreds of steps per call: compiling
# it costs minutes and tests dynamo's loop unrolling, not the layer
CHEAP_INVERSES = ("closed form", "solve", "series")


def _cases() -> list:
    cases = []
    for kind, registry in L.REGISTRIES.items():
        for name, label, options in L.registry_variants(registry):
            cases.append(pytest.param(kind, name, dict(options), id=f"{kind}-{name}-{label}"))
    return cases


class Recorder:
    """A torch.compile backend that keeps every graph it is given and hands it to another backend."""

    def __init__(self, backend: str = "aot_eager") -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.backend = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        return self.backend(gm, example_inputs)

    def ops(self) -> int:
        return sum(1 for gm in self.graphs for node in gm.graph.nodes if node.op in ("call_function", "call_method"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entry of an earlier test, no recompile limit reached."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _build(kind: str, name: str, options: dict) -> L.FlowLayer:
    c, h, w = SHAPE
    extra = NET if kind == "coupling" else {}
    layer = L.REGISTRIES[kind].build(name, c, size=(h, w), **extra, **options).train()
    layer(torch.randn(8, *SHAPE))  # data-dependent init, eagerly
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the identity-like init
    sync_init_flags(layer)
    return layer


def _grads(layer: nn.Module, x: Tensor, fn) -> tuple[Tensor, Tensor, list[Tensor]]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, logdet = fn(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    ((y * g).sum() + logdet.sum()).backward()
    return y.detach(), logdet.detach(), [x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]


@pytest.mark.parametrize(("kind", "name", "options"), _cases())
def test_compiled_layer_computes_its_eager_result(kind, name, options):
    """Forward, log-det and every gradient (input and parameters) of the compiled layer in training
    mode, the compiled inverse where it is cheap, and the compiled forward in eval mode (where the
    eval cache is bypassed inside the graph) equal eager within float64 rounding."""
    layer = _build(kind, name, options)
    x = torch.randn(BATCH, *SHAPE)
    recorder = Recorder()
    compiled = torch.compile(layer, backend=recorder, dynamic=False)

    y, logdet, grads = _grads(layer, x, layer)
    y_c, logdet_c, grads_c = _grads(layer, x, compiled)
    assert recorder.ops() > 0, "nothing of the layer was compiled"
    torch.testing.assert_close(y_c, y, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logdet_c, logdet, rtol=RTOL, atol=ATOL)
    assert len(grads_c) == len(grads)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, rtol=RTOL, atol=ATOL)

    # the inverse and eval mode differ from the training forward in their Python (the eval cache,
    # the inverse's factors), which dynamo's capture alone checks: its "eager" backend, seconds less
    capture = Recorder("eager")
    if layer.info.inverse in CHEAP_INVERSES:
        inverse = torch.compile(layer.inverse, backend=capture, dynamic=False)
        with torch.no_grad():
            x_back, inv_logdet = inverse(y)
        x_eager, inv_logdet_eager = layer.inverse(y)
        torch.testing.assert_close(x_back, x_eager.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(inv_logdet, inv_logdet_eager.detach(), rtol=RTOL, atol=ATOL)

    layer.eval()
    with torch.no_grad():
        eager = layer(x)
        compiled_eval = torch.compile(layer, backend=capture, dynamic=False)(x)
    for a, b in zip(compiled_eval, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert capture.ops() > 0


@pytest.mark.slow
def test_fused_coupling_compiles_with_inductor_at_two_batch_sizes():
    """The paper's coupling under inductor, at one batch size and then another (shapes turn
    dynamic: where inductor used to fail on the fused node's scratch buffers); its expm runs eagerly
    (``torch.compiler.disable``), the net and the split around it compile, and the result and
    gradients are eager's. Float32, the training precision."""
    torch.set_default_dtype(torch.float32)
    layer = L.MatrixExpCoupling(12, net=L.net_factory(hidden_channels=8, num_blocks=1)).train()
    layer(torch.randn(8, *SHAPE))
    L.perturb_output(layer, 0.05)  # S away from 0: a real series
    sync_init_flags(layer)
    recorder = Recorder("inductor")
    compiled = torch.compile(layer, backend=recorder)
    for batch in (4, 3):
        x = torch.randn(batch, *SHAPE)
        y, logdet, grads = _grads(layer, x, layer)
        y_c, logdet_c, grads_c = _grads(layer, x, compiled)
        torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logdet_c, logdet, rtol=1e-5, atol=1e-4)
        for g_c, g in zip(grads_c, grads, strict=True):
            torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-5)
    assert recorder.ops() > 0


PAPER_SMOKE = FlowConfig(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=8, num_blocks=1)
# the paper's model at its smallest (one level, one step): for the plumbing of train and bench
ONE_LEVEL = FlowConfig(image_shape=(3, 16, 16), steps=(1,), hidden_channels=4, num_blocks=1)


@pytest.mark.slow
def test_paper_model_training_step_compiles_with_inductor():
    """A training step of the paper's model (matrix-exp 1×1 conv and coupling, per-activation
    ActNorm, the paper's squeeze and split; the smoke preset's size) compiled with inductor, as
    ``mefbench train --compile`` does: the loss equals eager's to float32 rounding and so does every
    parameter's gradient, and an optimiser step on it runs."""
    assert PAPER_SMOKE.mixing == "matexp" and PAPER_SMOKE.coupling == "matexp"
    torch.set_default_dtype(torch.float32)
    model = MultiScaleFlow(PAPER_SMOKE)
    x = torch.rand(8, *PAPER_SMOKE.image_shape) * 2 - 1
    model.initialize(x)
    L.perturb_output(model, 0.01)

    def loss_and_grads(loss_fn) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_fn = compiled_loss(model, backend=None)
    compiled_fn = compiled_loss(model, backend="inductor")
    loss, grads = loss_and_grads(eager_fn)
    loss_c, grads_c = loss_and_grads(compiled_fn)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for g_c, g in zip(grads_c, grads, strict=True):
        # relative to the largest entry of each gradient: float32 sums reordered by fusion
        torch.testing.assert_close(g_c, g, rtol=0, atol=1e-4 * float(g.abs().max()) + 1e-7)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    value = train_step(model, opt, x, loss_fn=compiled_fn)
    assert abs(value - float(loss)) < 1e-5


def test_train_cli_compile_sets_the_backend_and_a_run_of_its_own(monkeypatch, capsys):
    """``--compile`` alone is inductor; the run gets its own directory and fills no table cell
    (compiled arithmetic is not the preset's, as with --amp)."""
    import mefbench.training
    from mefbench.cli import main

    seen = {}

    def fake_train(model, cfg, out, **kwargs):
        seen.update(cfg=cfg, out=out, **kwargs)
        raise KeyboardInterrupt  # stop here: the arguments are what is tested

    monkeypatch.setattr(mefbench.training, "train", fake_train)
    assert main(["train", "--preset", "smoke", "--compile", "--no-progress"]) == 130
    assert seen["cfg"].compile == "inductor" and "compile" in seen["out"].name and seen["tables"] == ()
    assert main(["train", "--preset", "smoke", "--compile", "aot_eager", "--no-progress"]) == 130
    assert seen["cfg"].compile == "aot_eager" and "compile-aot_eager" in seen["out"].name
    with pytest.raises(SystemExit):
        main(["train", "--preset", "smoke", "--compile", "tvm"])
    assert "invalid choice: 'tvm'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_compile_is_recorded_times_its_compilation_and_resumes(tmp_path):
    """``mefbench train --compile``: the run records its backend, leaves the compiling step out of
    the epoch's time (recording it apart), trains to eager's numbers within float32 rounding, and
    resumes compiled. aot_eager: the same capture as inductor, seconds instead of minutes."""
    from mefbench.presets import PRESETS
    from mefbench.training import train

    torch.set_default_dtype(torch.float32)
    _, cfg = PRESETS["smoke"].configs()
    model_cfg, cfg = ONE_LEVEL, dataclasses.replace(cfg, epochs=2)
    eager = train(model_cfg, cfg, tmp_path / "eager", progress=False)
    run = tmp_path / "compiled"
    compiled_cfg = dataclasses.replace(cfg, compile="aot_eager")
    part = train(model_cfg, compiled_cfg, run, progress=False, stop_after_epochs=1)
    assert part.status == "interrupted" and part.train["compile"] == "aot_eager"
    first = part.epochs[0]
    assert first.compile_time_s is not None and first.compile_time_s > 0
    # the matrix exponentials ran eagerly inside the compiled step: Table 6's statistics are recorded
    assert first.expm["m"]["count"] == eager.epochs[0].expm["m"]["count"] > 0
    assert eager.epochs[0].compile_time_s is None
    record = train(model_cfg, compiled_cfg, run, resume=True, progress=False)
    assert record.status == "finished" and [e.epoch for e in record.epochs] == [1, 2]
    assert record.epochs[1].compile_time_s is not None  # the resumed process compiled its step again
    # compiled graphs sum in another order: equal to eager up to float32 rounding, not bit for bit
    assert record.final.test_bpd == pytest.approx(eager.final.test_bpd, abs=1e-3)


@pytest.mark.slow
def test_bench_compile_reports_compiled_over_eager_per_model_row():
    """``mefbench bench --compile``: a model row's note gives each model's compiled/eager step ratio
    and its compile time; without it the note is empty. aot_eager on the smoke model keeps it short."""
    import re

    from mefbench.bench import Setting, _step_ratio, run_bench
    from mefbench.cli import build_parser

    assert build_parser().parse_args(["bench", "--compile"]).compile == "inductor"
    with pytest.raises(ValueError, match="--compile takes one of"):
        run_bench(quick=True, only=("model",), compile="tvm")
    torch.set_default_dtype(torch.float32)
    standard = dataclasses.replace(ONE_LEVEL, mixing="standard")
    cpu = torch.device("cpu")
    # the bench's plumbing, not a backend: dynamo's capture alone ("eager") compiles in seconds
    ratio, note = _step_ratio(standard, ONE_LEVEL, 4, 2, Setting(cpu, True, "eager"), ("standard", "MEF"))
    assert ratio > 0
    number = r"\d+\.\d\d×"
    assert re.fullmatch(
        rf"compiled/eager step \(eager\): MEF {number}, standard {number}; "
        r"compiling \(first call\): MEF \d+\.\d s, standard \d+\.\d s",
        note,
    ), note
    assert _step_ratio(standard, ONE_LEVEL, 4, 1, Setting(cpu, True), ("standard", "MEF"))[1] == ""
