"""A composable model: conditioner nets by name (and their protocol), the flow step as a config, the
CLI flags that set them, the README's examples trained through the CLI, and the public surface."""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mefbench
import mefbench.layers as L
from mefbench.checkpoint import load_model
from mefbench.cli import main
from mefbench.config import FlowConfig
from mefbench.models import MultiScaleFlow

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SMALL = dict(image_shape=(3, 8, 8), steps=(2, 1), hidden_channels=8, num_blocks=1)


# ----------------------------------------------------------------------------- the default step


def test_the_default_step_builds_the_model_it_always_built():
    """The model mefbench built before the flow step became a config (recorded in the data file from
    that version): the same state_dict keys in the same order, and the same values from the same
    seed, so the parameters are created, and the RNG drawn, in the same order."""
    reference = json.loads((DATA / "default_step_model.json").read_text())
    config = FlowConfig(**reference["config"])
    assert config.step == ("actnorm", "mixing", "coupling") and config.net == "resnet"
    torch.manual_seed(0)
    state = MultiScaleFlow(config).state_dict()
    assert list(state) == list(reference["tensors"])
    for key, expected in reference["tensors"].items():
        tensor = state[key].double()
        assert list(tensor.shape) == expected["shape"], key
        assert tensor.sum().item() == pytest.approx(expected["sum"], rel=1e-9, abs=1e-9), key
        assert tensor.square().sum().item() == pytest.approx(expected["sumsq"], rel=1e-9, abs=1e-9), key


def _layer_types(model: MultiScaleFlow, level: int = 0) -> list[type]:
    return [type(layer) for layer in model.levels[level].layers]


def test_the_step_is_built_in_the_order_the_config_gives():
    step = ("coupling", "actnorm", {"mixing": "householder", "options": {"reflections": 2}}, "mixing")
    model = MultiScaleFlow(FlowConfig(**SMALL, mixing="plu", coupling="additive", step=step))
    one_step = [L.AdditiveCoupling, L.ActNorm, L.HouseholderConv1x1, L.PLUConv1x1]
    assert _layer_types(model, 0) == [L.Squeeze, *one_step, *one_step]
    assert _layer_types(model, 1) == [L.Squeeze, *one_step]
    assert model.levels[0].layers[3].reflections == 2
    glow = MultiScaleFlow(FlowConfig(**SMALL, net="glow"))
    assert all(isinstance(m.net, L.GlowNet) for m in glow.modules() if isinstance(m, L.Coupling))


def test_step_specs_have_one_spelling_and_round_trip():
    config = FlowConfig(
        **SMALL, step=["actnorm", {"mixing": "plu", "options": {"diagonal": "exp"}}, {"coupling": "affine"}]
    )
    # a list becomes a tuple, options at the layer's defaults are left out
    assert config.step == ("actnorm", {"mixing": "plu"}, {"coupling": "affine"})
    assert FlowConfig.from_json(config.to_json()) == config


# ----------------------------------------------------------------------------- the nets


def test_nets_registry_builds_every_net_with_width_and_depth():
    for name, cls in L.NETS.items():
        net = L.net_factory(name, hidden_channels=6, num_blocks=2)(3, 10)
        assert isinstance(net, cls) and net(torch.randn(2, 3, 5, 5)).shape == (2, 10, 5, 5)
        head = L.output_layer(net)
        assert not head.weight.any() and (head.bias is None or not head.bias.any())
    with pytest.raises(ValueError, match="unknown conditioner net 'unet'; choose one of resnet, glow"):
        L.net_factory("unet")
    with pytest.raises(ValueError, match="CouplingNet has no option 'edge_bias'"):
        L.net_factory("resnet", edge_bias=False)
    with pytest.raises(ValueError, match=r"GlowNet option hidden_channels must be an integer, got 2\.5"):
        L.net_factory("glow", hidden_channels=2.5)
    with pytest.raises(ValueError, match="GlowNet option num_blocks must be an integer >= 0, got -1"):
        L.net_factory("glow", num_blocks=-1)(3, 4)


def test_glow_net_is_glows_f():
    """openai/glow's f: conv3×3 (edge padding, no bias, N(0, 0.05²)) → actnorm → ReLU →
    conv1×1 → actnorm → ReLU → zero conv3×3 with a bias and e^{3·logs}; actnorm initialised to
    zero mean and (biased) unit variance on the first batch."""
    net = L.GlowNet(3, 4, hidden_channels=16, num_blocks=1)
    stem, (block,), head = net.stem, net.blocks, net.head
    assert stem.conv.weight.shape == (16, 4, 3, 3) and stem.conv.bias is None  # 3 channels + the edge channel
    assert block.conv.weight.shape == (16, 16, 1, 1) and block.conv.bias is None
    assert head.weight.shape == (4, 17, 3, 3) and isinstance(head, L.nets.ZeroConv2d)
    assert 0.04 < stem.conv.weight.std().item() < 0.06
    x = torch.randn(64, 3, 6, 6) * 3 + 1
    net.train()(x)  # data-dependent init of the actnorms
    h = stem.norm(stem.conv(L.nets.edge_pad(x, 1)))
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-10, rtol=0)
    torch.testing.assert_close(h.square().mean(dim=(0, 2, 3)), torch.ones(16), atol=1e-5, rtol=0)
    # the edge channel is 1 exactly on the padding
    padded = L.nets.edge_pad(torch.zeros(1, 1, 2, 3), 1)
    assert padded.shape == (1, 2, 4, 5) and padded[0, 1].sum() == 4 * 5 - 2 * 3 and not padded[0, 1, 1:-1, 1:-1].any()
    # the head: (conv + b)·e^{3·logs}
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
        head.logs.fill_(0.1)
    v = torch.randn(2, 16, 4, 4)
    expected = F.conv2d(L.nets.edge_pad(v, 1), head.weight, head.bias) * torch.exp(torch.tensor(0.3))
    torch.testing.assert_close(head(v), expected)


class _NoHead(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.out = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def test_a_net_must_keep_the_protocol():
    with pytest.raises(ValueError, match=r"_NoHead has no recognisable output layer: .* as `\.head`"):
        L.AffineCoupling(4, net=_NoHead)
    with pytest.raises(ValueError, match=r"the output layer \(.head\) of its CouplingNet does not start at zero"):
        L.AffineCoupling(4, net=lambda i, o: _perturbed(L.CouplingNet(i, o, 4, 1)))
    with pytest.raises(ValueError, match=r"option net must be a factory .* got CouplingNet"):
        L.AffineCoupling(4, net=L.CouplingNet(2, 4, 4, 1))


def _perturbed(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        net.head.weight.fill_(0.1)
    return net


def test_perturb_output_redraws_every_coupling_head_and_refuses_a_net_without_one():
    model = MultiScaleFlow(FlowConfig(**SMALL, net="glow"))
    couplings = [m for m in model.modules() if isinstance(m, L.Coupling)]
    assert L.perturb_output(model, 0.01, torch.Generator().manual_seed(0)) == len(couplings) == 3
    heads = [c.net.head.weight.detach().clone() for c in couplings]
    assert all(h.std().item() == pytest.approx(0.01, rel=0.3) for h in heads)
    L.perturb_output(model, 0.01, torch.Generator().manual_seed(0))  # the same seed, the same draw
    assert all(torch.equal(c.net.head.weight, h) for c, h in zip(couplings, heads, strict=True))
    layer = L.AffineCoupling(4, net=L.net_factory(hidden_channels=4, num_blocks=1))
    L.perturb_output(layer, 4.0, fan_in=True)
    assert layer.net.head.weight.std().item() == pytest.approx(4 / (4 * 9) ** 0.5, rel=0.3)
    del layer.net.head  # a net whose output cannot be found is an error, never skipped
    with pytest.raises(ValueError, match="CouplingNet has no recognisable output layer"):
        L.perturb_output(nn.Sequential(layer), 0.01)


# ----------------------------------------------------------------------------- the CLI


def _record(run: Path) -> dict:
    return json.loads((run / "record.json").read_text())


def test_train_flags_for_the_net_and_the_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--preset", "smoke", "--net", "glow", "--net-option", "edge_bias=false",
            "--step", "coupling,actnorm,mixing:householder", "--epochs", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "runs" / "smoke-net-glow-edge_bias-False-step-coupling-actnorm-mixing.householder-ep1-seed0"
    model = _record(run)["model"]
    assert model["net"] == "glow" and model["net_options"] == {"edge_bias": False}
    assert model["step"] == ["coupling", "actnorm", {"mixing": "householder"}]
    trained = load_model(run)
    assert _layer_types(trained)[1:4] == [L.MatrixExpCoupling, L.ActNorm, L.HouseholderConv1x1]
    assert isinstance(trained.levels[0].layers[1].net, L.GlowNet)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--step", "actnorm,conv,coupling"], r"--step: FlowConfig.step\[1\]: unknown layer 'conv'"),
        (["--step", "[1, 2"], "--step: not a valid JSON list"),
        (["--step", "actnorm,mixing:lu"], r"--step: FlowConfig.step\[1\]: unknown mixing layer 'lu'"),
        (["--net-option", "width=3"], "--net-option: FlowConfig.net_options: CouplingNet has no option 'width'"),
        (["--mixing", "plu", "--mixing-option", "diagonal=2"], "PLUConv1x1 option diagonal must be a string"),
        (["--conv", "plu", "--mixing", "qr"], "--conv and --mixing are the same setting"),
    ],
)
def test_bad_model_flags_are_clear_errors(tmp_path, capsys, args, match):
    assert main(["train", "--preset", "smoke", "--out", str(tmp_path / "run"), *args]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_the_old_conv_flags_still_work_and_say_what_replaces_them(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--conv", "plu", "--conv-option", "diagonal=free", "--epochs", "1"]
    assert main([*args, "--out", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--conv is deprecated, use --mixing" in err and "--conv-option is deprecated, use --mixing-option" in err
    model = _record(run)["model"]
    assert model["mixing"] == "plu" and model["mixing_options"] == {"diagonal": "free"} and "conv" not in model


# ----------------------------------------------------------------------------- the README's examples


def _readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of each README block marked as run by this file."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- tests/test_compose.py runs this block -->\n```(\w+)\n(.*?)\n```", text, re.S)
    assert len(blocks) == 3, "the README's tested examples moved: update the marker or this test"
    return blocks


def test_readme_configs_build():
    _, code = next(b for b in _readme_blocks() if "two_mixing" in b[1])
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["glow"].net == "glow" and scope["glow"].coupling_options == {"scale": "sigmoid"}
    assert scope["two_mixing"].step[2] == {"mixing": "householder", "options": {"reflections": 4}}


def test_readme_steps_train_through_the_cli(tmp_path, monkeypatch):
    """The README's `mefbench train --step ...` lines, each trained (one epoch) through the CLI."""
    monkeypatch.chdir(tmp_path)
    _, code = next(b for b in _readme_blocks() if b[0] == "bash")
    lines = [shlex.split(line) for line in code.splitlines() if line.startswith("mefbench train")]
    assert len(lines) == 3
    for argv in lines:
        assert main([*argv[1:], "--epochs", "1", "--no-progress"]) == 0
    first, two, qr = (load_model(tmp_path / argv[argv.index("--out") + 1]) for argv in lines)
    assert _layer_types(first)[1:4] == [L.MatrixExpCoupling, L.ActNorm, L.MatrixExpConv1x1]
    assert _layer_types(two)[1:5] == [L.ActNorm, L.MatrixExpConv1x1, L.HouseholderConv1x1, L.MatrixExpCoupling]
    assert isinstance(two.levels[0].layers[4].net, L.GlowNet)
    assert _layer_types(qr)[1:4] == [L.ActNorm, L.QRConv1x1, L.MatrixExpCoupling]
    assert qr.levels[0].layers[2].diagonal == "exp"


def test_readme_custom_coupling_and_net_train_through_the_cli(tmp_path, monkeypatch):
    """The README's new coupling with its own conditioner, registered and trained through the CLI."""
    monkeypatch.chdir(tmp_path)
    language, code = next(b for b in _readme_blocks() if "BoundedAffineCoupling" in b[1])
    assert language == "python"
    try:
        exec(compile(code.replace('"runs/bounded"]', '"runs/bounded", "--no-progress"]'), "README.md", "exec"), {})
        record = _record(tmp_path / "runs" / "bounded")
        assert record["status"] == "finished"
        assert record["model"]["coupling"] == "bounded" and record["model"]["net"] == "tanh"
        assert record["model"]["coupling_options"] == {"bound": 1.5}
        contract = pytest.importorskip("test_contract")
        case = ("coupling", "bounded", "default", {})
        for check in (
            contract.test_metadata,
            contract.test_options_are_typed,
            contract.test_round_trip_float64,
            contract.test_logdet_matches_autograd_jacobian,
            contract.test_coupling_starts_as_the_identity,
        ):
            check(case)  # fmt: skip
    finally:
        L.NETS.pop("tanh", None)
        L.COUPLING.pop("bounded", None)


# ----------------------------------------------------------------------------- the public surface


def test_import_mefbench_gives_the_public_names():
    assert mefbench.layers is L and mefbench.linalg.expm is not None
    assert mefbench.FlowConfig is FlowConfig and mefbench.MultiScaleFlow is MultiScaleFlow
    assert set(mefbench.__all__) == {"FlowConfig", "MultiScaleFlow", "__version__", "layers", "linalg"}
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        mefbench.nope  # noqa: B018


def test_layers_all_is_layers_registries_and_documented_helpers():
    names = set(L.__all__)
    assert {"ConvNorm", "DataInitAffine", "ResidualBlock", "InitFlag", "GlowConv", "ZeroConv2d"}.isdisjoint(names)
    for name in L.__all__:
        obj = getattr(L, name)
        assert obj is not None
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"mefbench.layers.{name} has no docstring"
    registered = {cls.__name__ for registry in (*L.REGISTRIES.values(), L.NETS) for cls in registry.values()}
    assert registered <= names
    for name in ("action_plan", "action_forward", "action_backward", "workspace"):
        assert name in mefbench.linalg.__all__ and getattr(mefbench.linalg, name).__doc__
