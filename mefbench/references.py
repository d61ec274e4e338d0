"""Ports of the layers' reference implementations, run on a mefbench layer's own parameters.

``PORTS[name](layer)`` gives a :class:`Port`: the forward and inverse that the reference code of
``MIXING[name]`` (or ``COUPLING[name]``) computes, with its algorithm (what it builds on every
call, in which order, with which loops), reading the layer's current parameters. Two uses:

- tests (tests/test_references.py) check that each layer computes its reference's function:
  same weights in, same output and log-det out;
- ``mefbench bench --only references`` and ``benchmarks/reference_speed.py`` time a layer against
  its port side by side (interleaved, median of per-repeat ratios).

The ports are written here in torch from the public code named in each docstring (TensorFlow,
Cython and PyTorch), not copied; where a reference runs on the host (the emerging inverse's
Cython loop) the port keeps its order of work, vectorised over the batch and the channels.
:func:`convexp_before` keeps the convolution exponential as mefbench computed it before it
followed its reference (bound built twice per call, through the SVD's backward), for the bench
row that measures the speed-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import (
    ButterflyConv,
    Conv1x1,
    ConvExp,
    EmergingConv,
    LogisticMixtureCoupling,
    PeriodicConv,
    QRConv1x1,
    StandardConv1x1,
)
from .layers.mixture import LOG_SCALE_MIN
from .layers.periodic import kernel_spectrum
from .linalg import series_terms, taylor_tolerance

__all__ = ["PORTS", "Port", "convexp_before", "factor_builds", "port_for"]


@dataclass(frozen=True)
class Port:
    """A reference's forward and inverse on a layer's parameters: each maps a batch to (output, log-det)."""

    reference: str
    forward: Callable[[Tensor], tuple[Tensor, Tensor]]
    inverse: Callable[[Tensor], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------- shared pieces


def _glow_conv1x1(conv: Conv1x1 | None, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """Glow's 1×1 conv as the references call it: slogdet and, for the inverse, torch.inverse on
    every call, then a 1×1 conv2d."""
    if conv is None:
        return x, x.new_zeros(())
    if not isinstance(conv, StandardConv1x1):  # the Householder form above 64 channels: not what Glow calls
        raise ValueError(f"the references' 1×1 conv is Glow's full matrix, got {type(conv).__name__}")
    W = conv.W
    logdet = x.shape[2] * x.shape[3] * torch.linalg.slogdet(W).logabsdet
    if inverse:
        return F.conv2d(x, torch.inverse(W)[:, :, None, None]), -logdet
    return F.conv2d(x, W[:, :, None, None]), logdet


# ----------------------------------------------------------------------------- emerging


def _emerging_full_kernels(layer: EmergingConv) -> tuple[Tensor, Tensor]:
    """The reference's k×k masked kernels W₁·mask, W₂·mask_upsidedown from the layer's quadrants."""
    K1, K2 = layer.kernels()
    r = layer.kernel_size // 2
    return F.pad(K1, (r, 0, r, 0)), F.pad(K2, (0, r, 0, r))


def _emerging_pixelwise_solve(z: Tensor, w: Tensor, upper: bool, dilation: int) -> Tensor:
    """The reference's Cython inverse (conv2d/inverses/inverse_op_cython.pyx): pixel by pixel in
    raster order (``upper``) or reversed, each pixel's channels by back-substitution against the
    kernel's centre after subtracting every other tap; vectorised over the batch and channels."""
    b, c, h, width = z.shape
    k = w.shape[-1]
    r = k // 2
    centre = w[:, :, r, r]
    off = w.clone()
    off[:, :, r, r] = 0
    x = z.new_zeros(b, c, h + 2 * r * dilation, width + 2 * r * dilation)
    rows = range(h) if upper else reversed(range(h))
    for i in rows:
        cols = range(width) if upper else reversed(range(width))
        for j in cols:
            patch = x[:, :, i : i + 2 * r * dilation + 1 : dilation, j : j + 2 * r * dilation + 1 : dilation]
            rhs = z[:, :, i, j] - torch.einsum("ocpq,ncpq->no", off, patch)
            solved = torch.linalg.solve_triangular(centre, rhs.T, upper=upper).T
            x[:, :, i + r * dilation, j + r * dilation] = solved
    return x[:, :, r * dilation : r * dilation + h, r * dilation : r * dilation + width]


def emerging(layer: EmergingConv) -> Port:
    """Hoogeboom et al.'s emerging convolution (ehoogeboom/emerging, conv2d/conv2d.py,
    ``invertible_conv2D_emerging``, after the flow step's ``invertible_1x1_conv``): the forward's
    ``forward_fast`` (the kernels sliced to their quadrants, padded convs) and the pixel-by-pixel
    inverse."""
    d, r = layer.dilation, layer.kernel_size // 2
    pad = r * d

    def log_diagonals(w1: Tensor, w2: Tensor) -> Tensor:
        return (
            torch.log(torch.abs(torch.diagonal(w1[:, :, r, r]))).sum()
            + torch.log(torch.abs(torch.diagonal(w2[:, :, r, r]))).sum()
        )

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = _glow_conv1x1(layer.conv1x1, x, inverse=False)
        w1, w2 = _emerging_full_kernels(layer)
        z = F.conv2d(F.pad(z, (0, pad, 0, pad)), w1[:, :, r:, r:], dilation=d)
        z = F.conv2d(F.pad(z, (pad, 0, pad, 0)), w2[:, :, : r + 1, : r + 1], dilation=d)
        if layer.bias is not None:
            z = z + layer.bias[:, None, None]
        return z, (logdet + x.shape[2] * x.shape[3] * log_diagonals(w1, w2)).expand(x.shape[0])

    def inverse(z: Tensor) -> tuple[Tensor, Tensor]:
        w1, w2 = _emerging_full_kernels(layer)
        if layer.bias is not None:
            z = z - layer.bias[:, None, None]
        x = _emerging_pixelwise_solve(z, w2, upper=True, dilation=d)
        x = _emerging_pixelwise_solve(x, w1, upper=False, dilation=d)
        logdet = -z.shape[2] * z.shape[3] * log_diagonals(w1, w2)
        x, ld = _glow_conv1x1(layer.conv1x1, x, inverse=True)
        return x, (logdet + ld).expand(z.shape[0])

    return Port("ehoogeboom/emerging conv2d.py invertible_conv2D_emerging", forward, inverse)


# ----------------------------------------------------------------------------- periodic


def _periodic_spectrum(weight: Tensor, h: int, w: int) -> Tensor:
    """The reference's w_fft: rfft2 of the kernel flipped in rows and columns, zero padded to h×w,
    as (h, w//2 + 1, C_out, C_in)."""
    return torch.fft.rfft2(weight.flip(-2, -1), s=(h, w)).permute(2, 3, 0, 1)


def _periodic_logdet(w_fft: Tensor, w: int) -> Tensor:
    """The reference's compute_logdet: the one-sided slogdets, the conjugate columns counted again."""
    logdet = torch.linalg.slogdet(w_fft).logabsdet
    again = logdet[:, 1:-1] if w % 2 == 0 else logdet[:, 1:]
    return logdet.sum() + again.sum()


def periodic(layer: PeriodicConv) -> Port:
    """Hoogeboom et al.'s periodic convolution (ehoogeboom/emerging, conv2d/fourier.py,
    ``fourier_conv``): circular padding and a conv in the forward, the kernel's rfft2 and its
    slogdets for the log-det on every call; the inverse through Fourier space with the inverse of
    each frequency's matrix, then the shift back by the kernel's radius (``reindex``)."""
    r = layer.kernel_size // 2

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2:]
        y = F.conv2d(F.pad(x, (r, r, r, r), mode="circular"), layer.weight)
        if layer.bias is not None:
            y = y + layer.bias[:, None, None]
        logdet = _periodic_logdet(_periodic_spectrum(layer.weight, h, w), w)
        return y, logdet.expand(x.shape[0])

    def inverse(z: Tensor) -> tuple[Tensor, Tensor]:
        h, w = z.shape[2:]
        if layer.bias is not None:
            z = z - layer.bias[:, None, None]
        z = torch.roll(z, shifts=(r, r), dims=(2, 3))  # reindex(z, reverse=True)
        w_fft = _periodic_spectrum(layer.weight, h, w)
        logdet = _periodic_logdet(w_fft, w)
        x_fft = torch.einsum("uvoc,bcuv->bouv", torch.linalg.inv(w_fft), torch.fft.rfft2(z))
        return torch.fft.irfft2(x_fft, s=(h, w)), -logdet.expand(z.shape[0])

    return Port("ehoogeboom/emerging conv2d/fourier.py fourier_conv", forward, inverse)


# ----------------------------------------------------------------------------- convolution exponential


class _PowerNorm:
    """The reference's spectral_norm_conv hook (one power-iteration step per training forward,
    u and v persistent): W / (max(1, σ/β) + 1e-5), σ = uᵀ conv(v)."""

    def __init__(self, layer: ConvExp, size: tuple[int, int]) -> None:
        self.layer = layer
        shape = (layer.channels, *size)
        if layer.normaliser == "power":  # start from the layer's own vectors
            self.u, self.v = layer.power_u.clone(), layer.power_v.clone()
        else:
            self.u = F.normalize(torch.randn(math.prod(shape)), dim=0).reshape(shape).to(layer.weight)
            self.v = F.normalize(torch.randn(math.prod(shape)), dim=0).reshape(shape).to(layer.weight)

    def kernel(self, step: bool, stabiliser: float = 1e-5) -> Tensor:
        W, r = self.layer.weight, self.layer.kernel_size // 2
        if step:
            with torch.no_grad():
                v = F.normalize(F.conv_transpose2d(self.u[None], W, padding=r).reshape(-1), dim=0, eps=1e-12)
                self.v = v.reshape(self.v.shape)
                u = F.normalize(F.conv2d(self.v[None], W, padding=r).reshape(-1), dim=0, eps=1e-12)
                self.u = u.reshape(self.u.shape)
        sigma = torch.sum(self.u * F.conv2d(self.v[None], W, padding=r)[0])
        factor = torch.clamp(sigma / self.layer.max_norm, min=1.0)
        return W / (factor + stabiliser)


def _reference_conv_exp(x: Tensor, kernel: Tensor, terms: int) -> Tensor:
    """The reference's conv_exp: Σ_{i ≤ terms} M^i x / i!, dividing the product by i after each conv."""
    r = kernel.shape[-1] // 2
    result = product = x
    for i in range(1, terms + 1):
        product = F.conv2d(product, kernel, padding=r) / i
        result = result + product
    return result


def convexp(layer: ConvExp, terms: int | None = None, stabiliser: float = 1e-5) -> Port:
    """Hoogeboom et al.'s convolution exponential (ehoogeboom/convolution_exponential_and_sylvester,
    models/transformations/convexp: ConvExp, functional.conv_exp and its spectral_norm_conv hook):
    one power-iteration step per training forward, the pre-bias, the 1×1 conv, ``terms`` powers of
    M (the reference: 6 in training, 13 in eval), the trace, the post-bias.

    ``terms`` (powers summed, the reference's count: the series has terms + 1 summands) defaults
    to the reference's; ``stabiliser`` is the 1e-5 it adds to the normaliser's divisor. With the
    layer's T − 1 and 0 (and the layer's power normaliser) the port computes the layer's function.
    """
    norm: dict[tuple[int, int], _PowerNorm] = {}

    def count(x: Tensor) -> int:
        return terms if terms is not None else (6 if layer.training else 13)

    def kernel(x: Tensor, step: bool) -> Tensor:
        size = (x.shape[2], x.shape[3])
        if size not in norm:
            norm[size] = _PowerNorm(layer, size)
        return norm[size].kernel(step and layer.training, stabiliser)

    def trace(K: Tensor, x: Tensor) -> Tensor:
        r = layer.kernel_size // 2
        return torch.diagonal(K[:, :, r, r]).sum() * x.shape[2] * x.shape[3]

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        K = kernel(x, step=True)
        if layer.pre_bias is not None:
            x = x + layer.pre_bias
        z, logdet = _glow_conv1x1(layer.conv1x1, x, inverse=False)
        z = _reference_conv_exp(z, K, count(x))
        if layer.post_bias is not None:
            z = z + layer.post_bias
        return z, (logdet + trace(K, x)).expand(x.shape[0])

    def inverse(z: Tensor) -> tuple[Tensor, Tensor]:
        K = kernel(z, step=False)
        if layer.post_bias is not None:
            z = z - layer.post_bias
        x = _reference_conv_exp(z, -K, count(z))
        x, logdet = _glow_conv1x1(layer.conv1x1, x, inverse=True)
        if layer.pre_bias is not None:
            x = x - layer.pre_bias
        return x, (logdet - trace(K, z)).expand(z.shape[0])

    return Port("ehoogeboom/convolution_exponential_and_sylvester models/transformations/convexp", forward, inverse)


def convexp_before(layer: ConvExp, max_norm: float = 0.5) -> Port:
    """The convolution exponential as mefbench computed it before it followed its reference: no
    1×1 conv, β = 0.5, the bound max σ(K̂) by autograd through ``matrix_norm(ord=2)`` (the SVD's
    backward), built twice per call (once for the map, once for the log-det); the layer's kernel W."""

    def bound(W: Tensor, h: int, w: int) -> Tensor:
        r = W.shape[-1] // 2
        return torch.linalg.matrix_norm(kernel_spectrum(W, h + r, w + r), ord=2).amax()

    def kernel(W: Tensor, h: int, w: int) -> Tensor:
        return W * (max_norm / torch.clamp(bound(W, h, w), min=max_norm))

    def run(x: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2:]
        r = layer.kernel_size // 2
        K = kernel(layer.weight, h, w)
        logdet = sign * h * w * torch.diagonal(kernel(layer.weight, h, w)[:, :, r, r]).sum()
        terms = series_terms(max_norm, taylor_tolerance(x.dtype))
        out = term = x
        for i in range(1, terms):
            term = F.conv2d(term, sign * K, padding=r) / i
            out = out + term
        return out, logdet.expand(x.shape[0])

    return Port("mefbench before it followed its reference", lambda x: run(x, 1.0), lambda y: run(y, -1.0))


# ----------------------------------------------------------------------------- butterfly


def _butterfly_block(x: Tensor, w1: Tensor, level: int) -> Tensor:
    """The reference's butterfly_block at one level (use_act=False, no bias): x reshaped to
    (B, 2^level, 2, l/2), multiplied by w1 (2^level, 2, l/2, 2) and summed over the pair."""
    batch = x.shape[0]
    half = x[0].numel() >> (level + 1)
    v = x.reshape(batch, 2**level, 2, half)
    out = (v[..., None] * w1[None]).sum(dim=2)
    return out.permute(0, 1, 3, 2).reshape(batch, -1)


def _butterfly_inverse_block(y: Tensor, w: Tensor, level: int) -> Tensor:
    """The reference's butterfly_block.backward: w's inverse entry by entry, the same product."""
    batch = y.shape[0]
    half = y[0].numel() >> (level + 1)
    A, B, C, D = w[:, 0, :, 0], w[:, 1, :, 0], w[:, 0, :, 1], w[:, 1, :, 1]
    w_inv = torch.stack(
        [
            torch.stack([-D / (B * C - D * A), C / (B * C - D * A)], -1),
            torch.stack([-B / (A * D - B * C), A / (A * D - B * C)], -1),
        ],
        1,
    )
    v = y.reshape(batch, 2**level, 2, half)
    out = (v[..., None] * w_inv[None]).sum(dim=2)
    return out.permute(0, 1, 3, 2).reshape(batch, -1)


def butterfly(layer: ButterflyConv) -> Port:
    """Meng et al.'s ButterflyFlow (alexzhou907/butterflyflow, flows/butter_layer.py,
    general_butterfly_block_simple with reverse_perm, after the flow step's Conv1x1Flow): the
    levels one after the other, each as a broadcast product summed over the pair, the log-det
    from the blocks on every call; the inverse builds each level's inverse entry by entry."""

    def weights(level: int) -> Tensor:
        # ours (2, 2, D/2) as [[a, b], [c, d]] per pair; the reference's w1 (2^level, 2, l/2, 2)
        # holds w1[s, i, j, o] = the weight from input i to output o
        blocks = layer.blocks[level]
        segments = 2**level
        return blocks.reshape(2, 2, segments, -1).permute(2, 1, 3, 0)

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = _glow_conv1x1(layer.conv1x1, x, inverse=False)
        shape = z.shape
        z = z.reshape(shape[0], -1)
        for level in range(layer.levels):
            w1 = weights(level)
            z = _butterfly_block(z, w1, level)
            det = w1[:, 0, :, 0] * w1[:, 1, :, 1] - w1[:, 1, :, 0] * w1[:, 0, :, 1]
            logdet = logdet + torch.log(torch.abs(det)).sum()
        return z.reshape(shape), logdet.expand(x.shape[0])

    def inverse(y: Tensor) -> tuple[Tensor, Tensor]:
        shape = y.shape
        z = y.reshape(shape[0], -1)
        logdet = y.new_zeros(())
        for level in reversed(range(layer.levels)):
            w1 = weights(level)
            z = _butterfly_inverse_block(z, w1, level)
            det = w1[:, 0, :, 0] * w1[:, 1, :, 1] - w1[:, 1, :, 0] * w1[:, 0, :, 1]
            logdet = logdet - torch.log(torch.abs(det)).sum()
        x, ld = _glow_conv1x1(layer.conv1x1, z.reshape(shape), inverse=True)
        return x, (logdet + ld).expand(y.shape[0])

    return Port("alexzhou907/butterflyflow flows/butter_layer.py butterfly_block", forward, inverse)


# ----------------------------------------------------------------------------- QR 1×1


def qr(layer: QRConv1x1) -> Port:
    """Hoogeboom et al.'s QR 1×1 conv (ehoogeboom/emerging, conv2d/conv2d.py, the 'QR'
    decomposition): Q as a product of C Householder reflections, W = Q R, W⁻¹ = R⁻¹ Qᵀ with R⁻¹
    from matrix_inverse, all on every call."""

    def factors() -> tuple[Tensor, Tensor]:
        c = layer.channels
        eye = torch.eye(c, dtype=layer.v.dtype, device=layer.v.device)
        Q = eye
        for v in layer.v:
            v = v[:, None]
            Q = Q @ (eye - 2 * (v @ v.T) / (v.T @ v))
        rows, cols = torch.triu_indices(c, c, offset=1, device=layer.U.device)
        return Q, torch.diag(layer.scales()).index_put((rows, cols), layer.U)

    def logdet(x: Tensor) -> Tensor:
        return x.shape[2] * x.shape[3] * torch.log(torch.abs(layer.scales())).sum()

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        Q, R = factors()
        return F.conv2d(x, (Q @ R)[:, :, None, None]), logdet(x).expand(x.shape[0])

    def inverse(y: Tensor) -> tuple[Tensor, Tensor]:
        Q, R = factors()
        W_inv = torch.inverse(R) @ Q.T
        return F.conv2d(y, W_inv[:, :, None, None]), -logdet(y).expand(y.shape[0])

    return Port("ehoogeboom/emerging conv2d/conv2d.py decomposition='QR'", forward, inverse)


# ----------------------------------------------------------------------------- Flow++ mixture


def _mixture_inputs(layer: LogisticMixtureCoupling, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    x1, x2 = x.split([layer.c1, layer.c2], dim=1)
    h = layer._conditioner(x1)
    b, _, hh, ww = h.shape
    K = layer.components
    a, shift, logits, means, log_scales = h.reshape(b, 3 * K + 2, layer.c2, hh, ww).split([1, 1, K, K, K], dim=1)
    # Flow++'s layout: the components last
    params = (
        torch.tanh(a[:, 0]),
        shift[:, 0],
        logits.movedim(1, -1),
        means.movedim(1, -1),
        torch.clamp(log_scales, min=LOG_SCALE_MIN).movedim(1, -1),
    )
    return x1, x2, params


def _logistic_logpdf(x: Tensor, mean: Tensor, logscale: Tensor) -> Tensor:
    z = (x - mean) * torch.exp(-logscale)
    return z - logscale - 2 * F.softplus(z)


def _mix_logpdf(x: Tensor, logits: Tensor, means: Tensor, logscales: Tensor) -> Tensor:
    return torch.logsumexp(F.log_softmax(logits, -1) + _logistic_logpdf(x[..., None], means, logscales), -1)


def _mix_logcdf(x: Tensor, logits: Tensor, means: Tensor, logscales: Tensor) -> Tensor:
    z = (x[..., None] - means) * torch.exp(-logscales)
    return torch.logsumexp(F.log_softmax(logits, -1) + F.logsigmoid(z), -1)


def _mix_invcdf(y: Tensor, logits: Tensor, means: Tensor, logscales: Tensor, tol: float = 1e-12) -> Tensor:
    """Flow++'s mixlogistic_invcdf: bisection from 0 in [min μ − 200·Σs, max μ + 200·Σs] until the
    largest step is ≤ tol or 200 steps (the while_loop's condition read back after each step)."""
    x = torch.zeros_like(y)
    scales = torch.exp(logscales).sum(-1, keepdim=True)
    lb = (means - 200 * scales).amin(-1)
    ub = (means + 200 * scales).amax(-1)
    for _ in range(200):
        gt = (torch.exp(_mix_logcdf(x, logits, means, logscales)) > y).to(y.dtype)
        lt = 1 - gt
        new_x = gt * (x + lb) / 2 + lt * (x + ub) / 2
        lb, ub = gt * lb + lt * x, gt * x + lt * ub
        diff = (new_x - x).abs().amax()
        x = new_x
        if float(diff) <= tol:
            break
    return x


def mixture(layer: LogisticMixtureCoupling) -> Port:
    """Flow++'s logistic-mixture coupling (aravindsrinivas/flowpp, flows/flow_training.py
    MixLogisticCoupling with flows/logistic.py): a = tanh(o), the mixture's log-CDF exponentiated,
    then the logit (Inverse(Sigmoid)) and the affine; the inverse clamps the CDF to
    [1e-5, 1 − 1e-5] and bisects with mixlogistic_invcdf. The net is the layer's."""

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2, (s, t, logits, means, logscales) = _mixture_inputs(layer, x)
        out = torch.exp(_mix_logcdf(x2, logits, means, logscales))
        scale_logd = -torch.log(out) - torch.log1p(-out)
        out = torch.log(out) - torch.log1p(-out)
        out = torch.exp(s) * out + t
        logd = _mix_logpdf(x2, logits, means, logscales) + s + scale_logd
        return torch.cat([x1, out], 1), logd.sum(dim=(1, 2, 3))

    def inverse(y: Tensor) -> tuple[Tensor, Tensor]:
        y1, y2, (s, t, logits, means, logscales) = _mixture_inputs(layer, y)
        out = torch.exp(-s) * (y2 - t)
        invscale_logd = F.logsigmoid(out) + F.logsigmoid(-out)
        out = torch.clamp(torch.sigmoid(out), 1e-5, 1 - 1e-5)
        with torch.no_grad():
            x2 = _mix_invcdf(out, logits, means, logscales)
        logd = -(_mix_logpdf(x2, logits, means, logscales) + s) + invscale_logd
        return torch.cat([y1, x2], 1), logd.sum(dim=(1, 2, 3))

    return Port("aravindsrinivas/flowpp flows/flow_training.py MixLogisticCoupling", forward, inverse)


PORTS: dict[str, Callable[..., Port]] = {
    "emerging": emerging,
    "periodic": periodic,
    "convexp": convexp,
    "butterfly": butterfly,
    "qr": qr,
    "mixture": mixture,
}


def port_for(name: str, layer: torch.nn.Module) -> Port:
    """The port of registry entry ``name`` on ``layer``; a clear error for a layer with none."""
    if name not in PORTS:
        raise ValueError(f"no reference port for {name!r}; ports exist for {', '.join(PORTS)}")
    return PORTS[name](layer)


def factor_builds(
    layer: torch.nn.Module, size: tuple[int, int]
) -> tuple[Callable[[], object], Callable[[], object]] | None:
    """(what a forward builds from the parameters, what an inverse builds) for a mixing layer whose
    two differ: W and W⁻¹ of a 1×1 conv, the spectrum with its slogdets and the LU factors of a
    periodic conv, the log-dets and the inverse blocks of a butterfly. None where one build serves
    both directions (the kernels of emerging and convexp, the Woodbury factors)."""
    if isinstance(layer, Conv1x1):
        return (lambda: layer._matrix(inverse=False)), (lambda: layer._matrix(inverse=True))
    if isinstance(layer, PeriodicConv):
        return (lambda: layer.spectrum(*size)), (lambda: layer.lu_spectrum(*size))
    if isinstance(layer, ButterflyConv):
        return layer._blocks_logdet, layer.inverse_blocks
    return None
