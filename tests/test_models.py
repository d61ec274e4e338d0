import math

import pytest
import torch

from mefbench.models import FlowConfig, MultiScaleFlow, bits_per_dim, count_parameters
from mefbench.presets import PRESETS


def _perturbed(config: FlowConfig) -> MultiScaleFlow:
    model = MultiScaleFlow(config)
    model.initialize(torch.rand(16, *config.image_shape) * 2 - 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


SMALL = dict(image_shape=(3, 8, 8), steps=(2, 1), hidden_channels=8, num_blocks=1)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"prior": "learned", "actnorm": "channel", "squeeze": "channel"},
        {"mixing": "plu", "coupling": "affine"},
        {"mixing": "standard", "coupling": "additive"},
        {"step": ("coupling", "actnorm", "mixing")},  # coupling first
        {"step": ("actnorm", "mixing", {"mixing": "householder", "options": {"reflections": 2}}, "coupling")},
        {"net": "glow", "actnorm": "channel", "mixing": "plu", "coupling": "affine"},  # Glow's step
    ],
)
def test_exact_inverse_and_logdet(changes):
    config = FlowConfig(**SMALL, **changes)
    model = _perturbed(config)
    x = torch.rand(3, *config.image_shape) * 2 - 1
    zs, logdet, _ = model(x)
    assert torch.allclose(model.inverse(zs), x, atol=1e-10)

    # log-det of the whole model against the autograd Jacobian of the flattened map
    def flat(v):
        return torch.cat([z.reshape(-1) for z in model(v.reshape(1, *config.image_shape))[0]])

    J = torch.autograd.functional.jacobian(flat, x[0].reshape(-1))
    assert torch.allclose(logdet[0], torch.linalg.slogdet(J).logabsdet, atol=1e-8)


def test_log_prob_of_standard_prior_is_normal_density():
    config = FlowConfig(**SMALL)
    model = MultiScaleFlow(config)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    zs, logdet, logp = model(x)
    z = torch.cat([z.flatten(1) for z in zs], 1)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(logp, expected)
    assert torch.allclose(model.log_prob(x), logp + logdet)


def test_bits_per_dim_formula_by_hand():
    # D = 2 dims, log p = -3 nats: bpd = -(-3 - 2 ln 128) / (2 ln 2) = (3 + 14 ln 2) / (2 ln 2)
    value = bits_per_dim(torch.tensor([-3.0]), 2)
    assert value.item() == pytest.approx((3 + 14 * math.log(2)) / (2 * math.log(2)))
    # a uniform density on [-1, 1)^D (log p = -D ln 2) is exactly 8 bits per dim
    assert bits_per_dim(torch.tensor([-6 * math.log(2)]), 6).item() == pytest.approx(8.0)


def test_sample_shapes_and_temperature_zero():
    config = FlowConfig(**SMALL, prior="learned")
    model = _perturbed(config)
    x = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 8, 8) and torch.isfinite(x).all()
    assert (x >= -1).all() and (x < 1).all()


def test_paper_parameter_count_and_levels():
    """The paper's CIFAR-10 model has 37.7M parameters (Table 3) and runs at the three levels the
    benchmarks use (presets.LEVELS: a level's latent is half its channels, the last one all)."""
    from mefbench.presets import CPU_MEF, LEVELS, PAPER_MEF

    model = MultiScaleFlow(PRESETS[PAPER_MEF].model)
    assert round(count_parameters(model) / 1e6, 1) == 37.7
    *split, last = model.latent_shapes
    assert tuple((2 * c, h, w) for c, h, w in split) + (last,) == LEVELS
    assert PRESETS[CPU_MEF].scale == "cpu" and PRESETS[CPU_MEF].model.coupling == PRESETS[PAPER_MEF].model.coupling


def test_config_json_round_trip(tmp_path):
    config = FlowConfig(
        **SMALL, prior="learned", coupling_options={"rank": 2}, mixing_options={}, net="glow",
        net_options={"edge_bias": False}, step=("actnorm", {"coupling": "additive"}, "mixing", "coupling"),
    )  # fmt: skip
    config.to_json(tmp_path / "c.json")
    assert FlowConfig.from_json(tmp_path / "c.json") == config
    assert FlowConfig.from_json(config.to_json()) == config


def test_model_dicts_of_older_records_load():
    new = FlowConfig(**SMALL).to_dict()
    schema2 = {k: v for k, v in new.items() if k not in ("mixing", "mixing_options", "net", "net_options", "step")}
    schema2.update(conv="matexp", conv_options={})
    schema1 = {**schema2, "scale": "tanh", "coupling_rank": None}  # flat options, at their defaults
    del schema1["conv_options"], schema1["coupling_options"]
    for old in (schema1, schema2):
        assert FlowConfig.from_dict(old) == FlowConfig(**SMALL)
    flat = {**schema1, "coupling": "affine", "scale": "sigmoid"}
    assert FlowConfig.from_dict(flat).coupling_options == {"scale": "sigmoid"}
    with pytest.raises(ValueError, match=r"both 'conv' .* and 'mixing'"):
        FlowConfig.from_dict({**schema2, "mixing": "plu"})
    with pytest.raises(TypeError):  # the old names are read from records, not taken by the constructor
        FlowConfig(**SMALL, conv="plu")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"mixing": "lu"}, "FlowConfig.mixing must be one of"),
        (
            {"mixing_options": {"diagonal": "free"}},
            "FlowConfig.mixing_options: MatrixExpConv1x1 has no option 'diagonal'",
        ),
        ({"coupling_options": {"hidden_channels": 3}}, "cannot set hidden_channels"),
        ({"coupling_options": {"net": "glow"}}, "cannot set net"),
        ({"coupling_options": {"rank": "2"}}, "MatrixExpCoupling option rank must be an integer or None, got '2'"),
        ({"net": "unet"}, "FlowConfig.net must be one of"),
        ({"net_options": {"num_blocks": 2}}, "net_options cannot set hidden_channels or num_blocks"),
        ({"net_options": {"edge_bias": True}}, "CouplingNet has no option 'edge_bias'"),
        ({"net": "glow", "net_options": {"edge_bias": 1}}, "GlowNet option edge_bias must be true or false"),
        ({"hidden_channels": 0}, "FlowConfig.hidden_channels must be an integer >= 1"),
        ({"step": ()}, "FlowConfig.step must be a non-empty list"),
        ({"step": "actnorm,mixing"}, "FlowConfig.step must be a non-empty list"),
        ({"step": ("actnorm", "conv", "coupling")}, r"FlowConfig.step\[1\]: unknown layer 'conv'"),
        ({"step": ({"mixing": "nope"},)}, r"FlowConfig.step\[0\]: unknown mixing layer 'nope'"),
        ({"step": ({"mixing": "plu", "coupling": "affine"},)}, r"step\[0\].*exactly one of 'mixing', 'coupling'"),
        ({"step": ({"mixing": "plu", "option": {}},)}, r"step\[0\].*exactly one of"),
        ({"step": ({"mixing": "plu", "options": {"diagonal": 1}},)}, r"step\[0\]: PLUConv1x1 option diagonal must be"),
        ({"step": ({"coupling": "affine", "options": {"net": "glow"}},)}, r"step\[0\] cannot set net"),
        ({"step": (3,)}, r"FlowConfig.step\[0\] must be a string or a dict"),
        ({"coupling_options": {"scale": object()}}, "JSON-serialisable"),
        # option values of the wrong type are named here, not deep inside torch
        ({"coupling_options": {"rank": 2.5}}, "MatrixExpCoupling option rank must be an integer or None, got 2.5"),
        (
            {"mixing": "convexp", "mixing_options": {"kernel_size": "3"}},
            "option kernel_size must be an integer, got '3'",
        ),
        ({"coupling": "spline", "coupling_options": {"bound": True}}, "option bound must be a number, got True"),
        ({"image_shape": (3, 12, 12), "steps": (1, 1, 1)}, "divisible by 8"),
        ({"steps": ()}, "at least one level"),
    ],
)
def test_bad_config(changes, match):
    with pytest.raises(ValueError, match=match):
        FlowConfig(**{**SMALL, **changes})


def test_wrong_image_shape_is_a_clear_error():
    model = MultiScaleFlow(FlowConfig(**SMALL))
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 8, 8\)"):
        model(torch.zeros(1, 1, 8, 8))


def test_names_users_import_still_work_or_say_what_replaces_them():
    import mefbench.layers as L
    from mefbench import linalg, results

    assert callable(linalg.expm) and callable(linalg.expm_action) and callable(results.load_runs)
    assert set(L.CONV1X1) <= set(L.MIXING) and "matexp" in L.COUPLING and "smoke" in PRESETS
    from mefbench.config import TrainConfig
    from mefbench.stats import pool_stats

    assert TrainConfig().dataset == "cifar10" and pool_stats([]) == {}
