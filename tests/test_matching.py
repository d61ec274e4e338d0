"""mefbench.matching: parameter counts without building, and widths that match a parameter budget."""

import dataclasses

import pytest

from mefbench.config import FlowConfig
from mefbench.layers import COUPLING, registry_variants
from mefbench.matching import match_hidden_channels, match_widths, parameter_count
from mefbench.models import MultiScaleFlow, count_parameters
from mefbench.presets import MATCH_TOLERANCE, PRESETS, STABILITY_COUPLINGS

SMALL = FlowConfig(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=6, num_blocks=1)


@pytest.mark.parametrize(("coupling", "label", "options"), registry_variants(COUPLING))
def test_the_count_is_the_built_models(coupling, label, options):
    config = dataclasses.replace(SMALL, coupling=coupling, coupling_options=options)
    for hidden in (1, 3, 7):  # 7: read off the quadratic, not built
        built = count_parameters(MultiScaleFlow(dataclasses.replace(config, hidden_channels=hidden)))
        assert parameter_count(config, hidden) == built


def test_the_nearest_width_is_chosen():
    config = dataclasses.replace(SMALL, coupling="affine")
    for budget in (5_000, 23_456, 60_000):
        chosen = match_hidden_channels(config, budget).hidden_channels
        nearest = min(range(1, 80), key=lambda h: (abs(parameter_count(config, h) - budget), h))
        assert chosen == nearest
    assert match_hidden_channels(config, 1).hidden_channels == 1
    with pytest.raises(ValueError, match="budget"):
        match_hidden_channels(config, 0)


def test_every_coupling_matches_the_paper_model_within_1_percent():
    """At the paper's scale, against MEF's 37.7M parameters (matrix-exp coupling, hidden 128): every
    coupling of the registry lands within 1%, and affine at the paper's own choice, hidden 132."""
    mef = PRESETS["paper-t2-mef-cifar10"].model
    rows = {
        f"{c}/{lab}": dataclasses.replace(mef, coupling=c, coupling_options=o)
        for c, lab, o in registry_variants(COUPLING)
    }
    match = match_widths(mef, rows, tolerance=0.01, search=0.0)
    assert match.reference_hidden == 128 and match.reference_params == 37_683_752
    assert match.within, {r: match.ratio(r) for r in rows}
    assert match.hidden["affine/tanh"] == 132 and match.params["affine/tanh"] == 37_756_808  # test_fidelity's count


def test_the_cpu_comparisons_are_matched_within_their_tolerance():
    """Table 4's two couplings and the stability benchmark's five, as the presets build them."""
    for scale in ("cpu", "smoke"):
        t4 = [PRESETS[f"{scale}-t4-{c}-lr0.01"].model for c in ("affine", "matexp")]
        counts = [parameter_count(m) for m in t4]
        assert abs(counts[0] / counts[1] - 1) <= MATCH_TOLERANCE[scale]
        assert PRESETS[f"{scale}-t2-mef"].model == t4[1]  # MEF's run is Table 4's matrix-exp cell
    slugs = [c if lab == "default" else f"{c}-{lab}" for c, lab in STABILITY_COUPLINGS]
    models = [PRESETS[f"cpu-stab-{s}-lr0.01"].model for s in slugs]
    reference = parameter_count(PRESETS["cpu-stab-matexp-lr0.01"].model)
    assert all(abs(parameter_count(m) / reference - 1) <= MATCH_TOLERANCE["cpu"] for m in models)
    assert len({m.hidden_channels for m in models}) > 2  # the widths differ: matching did something


def test_a_reference_width_that_cannot_be_matched_moves_or_says_so():
    mef = dataclasses.replace(SMALL, hidden_channels=16)
    rows = {
        "spline": dataclasses.replace(mef, coupling="spline"),
        "affine": dataclasses.replace(mef, coupling="affine"),
    }
    fixed = match_widths(mef, rows, tolerance=0.001, search=0.0)
    assert fixed.reference_hidden == 16 and not fixed.within  # reported, not raised
    moved = match_widths(mef, rows, tolerance=0.01, search=0.5)
    assert moved.within and moved.reference_hidden != 16


def test_the_count_follows_the_net_and_every_coupling_of_the_step():
    """A Glow net and a step with a second coupling of its own options: the count without building
    the model at that width equals the built model's, at several widths."""
    config = FlowConfig(
        image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=5, num_blocks=1, net="glow",
        step=("actnorm", "mixing", "coupling", {"coupling": "affine", "options": {"scale": "sigmoid"}}),
    )  # fmt: skip
    for hidden in (5, 9, 13):
        built = count_parameters(MultiScaleFlow(dataclasses.replace(config, hidden_channels=hidden)))
        assert parameter_count(config, hidden) == built
