"""The paper presets build the official MEF code's model (changyi7231/MEF), without that code.

- Parameter counts of the four paper presets equal what instantiating the official code gives.
- The coupling net has the official per-block structure and initialisation statistics.
- ``official_bits_per_dim`` below re-computes, from our modules' parameters, what the official
  ``Model.forward`` + ``compute_loss`` compute (its squeeze, split, ActNorm, 1×1 conv forms, the
  coupling's channel layout of S, the low-rank form with its 1e-8, the residual blocks with an ELU
  after every add), written out with plain torch ops and ``torch.linalg.matrix_exp``; our model
  must give the same bits/dim for every conv × coupling the official code supports.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import mefbench.layers as L
from mefbench.models import FlowConfig, MultiScaleFlow, count_parameters
from mefbench.presets import PRESETS

OFFICIAL_COUNTS = {
    "paper-t2-mef-cifar10": 37_683_752,
    "paper-t4-affine-lr0.01": 37_756_808,
    "paper-t5-plu": 37_691_816,
    "paper-t2-mef-imagenet64": 46_615_080,
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL_COUNTS))
def test_paper_presets_have_the_official_parameter_counts(preset):
    torch.set_default_dtype(torch.float32)  # faster to build; the count does not depend on it
    assert count_parameters(MultiScaleFlow(PRESETS[preset].model)) == OFFICIAL_COUNTS[preset]


def test_paper_presets_use_the_official_forms():
    assert PRESETS["paper-t5-plu"].model.mixing_options == {"diagonal": "free"}
    assert PRESETS["paper-t4-affine-lr0.001"].train.decay_epochs == ()  # official step_size 300 > 200 epochs
    assert PRESETS["paper-t4-affine-lr0.01"].train.decay_epochs == (40,)
    assert PRESETS["paper-t4-affine-lr0.01"].model.hidden_channels == 132


def test_residual_block_structure_and_no_bias_before_a_norm():
    net = L.CouplingNet(3, 10, hidden_channels=8, num_blocks=2)
    block = net.blocks[0]
    kinds = [(m.conv.kernel_size, m.activation, m.init_scale) for m in block.body]
    assert kinds == [((3, 3), True, 1.0), ((1, 1), True, 1.0), ((3, 3), False, 0.0)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None for c in convs if c is not net.head) and net.head.bias is not None
    # the block is ELU(h + body(h)), with an ELU after every add
    h = torch.randn(4, 8, 5, 5)
    net.train()
    net(torch.randn(4, 3, 5, 5))  # data-dependent init
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.eval()
    body = block.body
    expected = F.elu(h + body[2](body[1](body[0](h))))
    torch.testing.assert_close(block(h), expected)
    torch.testing.assert_close(net(torch.ones(1, 3, 5, 5)), net.head(net.blocks(net.stem(torch.ones(1, 3, 5, 5)))))


def test_coupling_net_init_statistics():
    """kaiming_uniform draws, then each conv divided by its output's std (the stem: of the ELU
    of it) on the init batch; the norm then standardises; a block's last norm starts at zero."""
    torch.manual_seed(0)
    net = L.CouplingNet(3, 6, hidden_channels=16, num_blocks=1)
    stem = net.stem
    w0 = stem.conv.weight.detach().clone()
    bound = math.sqrt(6 / w0[0].numel())  # kaiming_uniform, a = 0
    assert w0.abs().max() <= bound and w0.abs().max() > 0.8 * bound
    x = torch.randn(64, 3, 6, 6) * 3 + 1
    net.train()
    net(x)
    std = F.elu(F.conv2d(x, w0, padding=1)).std(dim=(0, 2, 3))  # before init, the norm is (1, 0)
    torch.testing.assert_close(stem.conv.weight, w0 / (std + 1e-8).view(-1, 1, 1, 1))
    with torch.no_grad():
        h = stem.norm(stem.conv(x))
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-9, rtol=0)
    torch.testing.assert_close(h.std(dim=(0, 2, 3)), torch.ones(16), atol=1e-6, rtol=0)  # n − 1, as torch.std
    last = net.blocks[0].body[2].norm
    assert torch.equal(last.weight, torch.zeros_like(last.weight)) and torch.equal(
        last.bias, torch.zeros_like(last.bias)
    )


# ----------------------------------------------------------------------------- the official computation


def _squeeze(x):  # channel (2·dy + dx)·C + c
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def _official_net(net: L.CouplingNet, x):
    def conv_norm(m, v):
        v = F.conv2d(v, m.conv.weight, padding=m.conv.padding)
        v = v * m.norm.weight + m.norm.bias
        return F.elu(v) if m.activation else v

    out = conv_norm(net.stem, x)
    for block in net.blocks:
        a, b, c = block.body
        out = F.elu(conv_norm(c, conv_norm(b, conv_norm(a, out))) + out)
    return F.conv2d(out, net.head.weight, net.head.bias, padding=1)


def _official_conv(layer, x):
    n = x.shape[2] * x.shape[3]
    if isinstance(layer, L.MatrixExpConv1x1):
        W, logdet = torch.linalg.matrix_exp(layer.W), torch.diagonal(layer.W).sum() * n
    elif isinstance(layer, L.StandardConv1x1):
        W, logdet = layer.W, torch.linalg.slogdet(layer.W).logabsdet * n
    else:  # official "decomposition": l masked + I, u masked upper (diagonal included), log|u_ii|
        c = layer.channels
        lower = torch.tril(torch.ones(c, c), -1)
        W = layer.P @ (layer.L * lower + torch.eye(c)) @ (layer.U * (1 - lower))
        logdet = torch.diagonal(layer.U).abs().log().sum() * n
    return F.conv2d(x, W.view(*W.shape, 1, 1)), logdet


def _official_coupling(layer, x):
    c2 = layer.c2
    x1, x2 = x[:, : layer.c1], x[:, layer.c1 :]
    out = _official_net(layer.net, x1)
    if isinstance(layer, L.AdditiveCoupling):
        return torch.cat([x1, x2 + out], 1), x.new_zeros(x.shape[0])
    s = layer.scale
    bounded = lambda o: s.alpha * torch.tanh(s.beta * o + s.gamma) + s.delta  # noqa: E731
    if isinstance(layer, L.AffineCoupling):
        shift, raw = out.chunk(2, dim=1)
        log_scale = bounded(raw)
        return torch.cat([x1, torch.exp(log_scale) * x2 + shift], 1), log_scale.sum([1, 2, 3])
    chunks = out.unsqueeze(2).chunk(out.shape[1] // c2, dim=1)  # c2 channels each: (B, c2, 1, H, W)
    shift = chunks[0].squeeze(2)
    v = x2.unsqueeze(2).permute(0, 3, 4, 1, 2)  # (B, H, W, c2, 1)
    if c2 <= 24:  # full c2 × c2 matrices, S[i, j] from chunk 1 + j, entry i
        S = bounded(torch.cat(chunks[1:], dim=2).permute(0, 3, 4, 1, 2))
        y = torch.linalg.matrix_exp(S.contiguous()) @ v
        logdet = torch.diagonal(S, dim1=-2, dim2=-1).sum([1, 2, 3])
    else:  # rank 3: B (k × c2) from chunks 1..3, A (c2 × k) from chunks 4..6, plus 1e-8
        k = 3
        B = bounded(torch.cat(chunks[1 : k + 1], dim=2).permute(0, 3, 4, 2, 1)) + 1e-8
        A = bounded(torch.cat(chunks[k + 1 :], dim=2).permute(0, 3, 4, 1, 2)) + 1e-8
        BA = B @ A
        eye = torch.eye(k, dtype=x.dtype)
        phi = torch.linalg.solve(BA, torch.linalg.matrix_exp(BA.contiguous()) - eye)
        y = v + A @ phi @ B @ v
        logdet = torch.diagonal(BA, dim1=-2, dim2=-1).sum([1, 2, 3])
    y = y.permute(0, 3, 4, 1, 2).squeeze(2) + shift
    return torch.cat([x1, y], 1), logdet


def official_bits_per_dim(model: MultiScaleFlow, x):
    """What the official Model.forward and compute_loss give, from our modules' parameters."""
    logdet = x.new_zeros(x.shape[0])
    zs = []
    out = x
    levels = len(model.levels)
    for i, level in enumerate(model.levels):
        out = _squeeze(out)
        for layer in list(level)[1:]:  # skip our Squeeze: done above
            if isinstance(layer, L.ActNorm):
                scale = F.softplus(layer.theta)
                out, ld = scale * out + layer.bias, torch.log(scale).sum().expand(x.shape[0])
            elif isinstance(layer, L.Coupling):
                out, ld = _official_coupling(layer, out)
            else:
                out, ld = _official_conv(layer, out)
            logdet = logdet + ld
        if i < levels - 1:
            half = out.shape[1] // 2
            zs.append(out[:, half:])
            out = out[:, :half]
    zs.append(out)
    z = torch.cat([v.flatten(1) for v in zs], 1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    dims = x[0].numel()
    return -(log_p + logdet - math.log(2**8 / 2) * dims) / (math.log(2) * dims)


COMBINATIONS = [
    (conv, options, coupling)
    for conv, options in (("standard", {}), ("plu", {"diagonal": "free"}), ("matexp", {}))
    for coupling in ("additive", "affine", "matexp")
]


@pytest.mark.parametrize(("conv", "conv_options", "coupling"), COMBINATIONS)
def test_same_weights_give_the_official_bits_per_dim(conv, conv_options, coupling):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    config = FlowConfig(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=16, num_blocks=2, mixing=conv,
                        mixing_options=conv_options, coupling=coupling)  # fmt: skip
    model = MultiScaleFlow(config)
    x = torch.rand(32, 3, 16, 16) * 2 - 1
    model.initialize(x)
    with torch.no_grad():
        for p in model.parameters():  # away from the init (the output convs are zero there)
            p.add_(0.05 * torch.randn_like(p))
        model.eval()
        ours = model.bits_per_dim(x[:8])
        theirs = official_bits_per_dim(model, x[:8])
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)


def test_the_low_rank_form_matches_the_official_layout():
    """Four levels on 16×16 leave 96 channels (c = 48 > 24) at the last: the official rank-3 form."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(1)
    config = FlowConfig(image_shape=(3, 16, 16), steps=(1, 1, 1, 1), hidden_channels=8, num_blocks=1)
    model = MultiScaleFlow(config)
    assert model.levels[-1][-1].rank == 3
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    model.initialize(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.eval()
        torch.testing.assert_close(model.bits_per_dim(x[:4]), official_bits_per_dim(model, x[:4]), rtol=2e-6, atol=2e-6)


def test_plu_free_diagonal_can_collapse_and_exp_cannot():
    free = L.PLUConv1x1(4, diagonal="free")
    with torch.no_grad():
        free.U.diagonal()[0] = 0.0  # a diagonal entry that crossed 0: singular, as in the paper's Table 5 story
    _, logdet = free(torch.randn(1, 4, 2, 2))
    assert logdet.item() == -math.inf
    glow = dataclasses.replace(FlowConfig(), mixing="plu")
    assert glow.mixing_options == {}  # the default is Glow's exp form, which never becomes singular
