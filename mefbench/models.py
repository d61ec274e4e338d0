"""The paper's multi-scale flow (docs/design.md §3), built from a JSON-serialisable config (:class:`FlowConfig`).

Each level: squeeze, ``steps[level]`` flow steps, then, except at the last level, half the
channels are split off as a latent. A flow step is the config's ``step``, a list of layer specs
(the paper's: ActNorm → mixing layer → coupling). Latents have a standard normal prior (the paper)
or Glow's learned prior, conditioned at each split on the channels that go on.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from .config import FlowConfig
from .layers import COUPLING, MIXING, ActNorm, FlowLayer, FlowSequential, NetFactory, Squeeze, set_amp

__all__ = ["MODEL_REVISION", "MultiScaleFlow", "bits_per_dim", "build_step", "count_parameters"]

_LOG_2PI = math.log(2 * math.pi)

# What the same FlowConfig builds. Records store it, so that runs of different revisions are never
# mixed in one table and an old checkpoint is refused with a clear message.
#   1: one ELU after all residual blocks, conv biases, PyTorch's default conv init, α = 1/√(c·k)
#      for low-rank factors, S stored row by row in the net output
#   2: the official MEF code's model (ELU after every block, no bias before a Norm, kaiming init
#      rescaled by the output std, S column by column, α = 1/c), Bessel-corrected init stds
#   3: the zoo's layers follow their own papers' code by default: emerging with square-quadrant
#      masks, a bias, Glow's 1×1 conv first and the reference init; periodic with a bias;
#      convexp with its 1×1 conv and β = 0.9; butterfly with one level, identity init and a 1×1
#      conv; the mixture coupling with Flow++'s scale map. The paper's layers (standard, PLU and
#      matrix-exp 1×1 convs; additive, affine and matrix-exp couplings) build as in revision 2.
MODEL_REVISION = 3


class LearnedPrior(nn.Module):
    """Glow's prior for a latent: N(μ, e^{2 log σ}) with (μ, log σ) = zero-init conv3×3(condition)."""

    def __init__(self, cond_channels: int, channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv: nn.Conv2d | None = None
        if cond_channels:
            self.conv = nn.Conv2d(cond_channels, 2 * channels, 3, padding=1)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(cast(Tensor, self.conv.bias))  # a Conv2d built with a bias
        else:  # the top latent: learned constants
            self.top = nn.Parameter(torch.zeros(1, 2 * channels, *size))

    def params(self, cond: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        h = self.conv(cond) if self.conv is not None else self.top.expand(batch, -1, -1, -1)
        mean, log_std = h.chunk(2, dim=1)
        return mean, log_std


def _standard_normal_logp(z: Tensor) -> Tensor:
    return -0.5 * (z**2 + _LOG_2PI).flatten(1).sum(1)


class MultiScaleFlow(nn.Module):
    """The paper's multi-scale flow; ``log_prob``, ``bits_per_dim``, exact ``inverse``, ``sample``."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        c, h, w = config.image_shape
        net = config.net_factory()
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        levels = len(config.steps)
        for level, steps in enumerate(config.steps):
            c, h, w = 4 * c, h // 2, w // 2
            layers: list[FlowLayer] = [Squeeze(config.squeeze)]
            for _ in range(steps):
                layers += build_step(config, c, (h, w), net)
            self.levels.append(FlowSequential(*layers))
            last = level == levels - 1
            z_channels = c if last else c // 2
            self.latent_shapes.append((z_channels, h, w))
            if config.prior == "learned":
                self.priors.append(LearnedPrior(0 if last else c - z_channels, z_channels, (h, w)))
            if not last:
                c = c - z_channels

    # ------------------------------------------------------------------ the map and its inverse

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            raise ValueError(
                f"MultiScaleFlow expects images of shape (B, {', '.join(map(str, self.config.image_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """x -> (latents, log|det ∂z/∂x|, log p(z)) per sample."""
        self._check(x)
        logdet = x.new_zeros(x.shape[0])
        logp = x.new_zeros(x.shape[0])
        zs = []
        h = x
        for i, level in enumerate(self.levels):
            h, ld = level(h)
            logdet = logdet + ld
            if i < len(self.levels) - 1:
                keep = h.shape[1] - self.latent_shapes[i][0]
                h, z = h[:, :keep], h[:, keep:]
                cond: Tensor | None = h
            else:
                z, cond = h, None
            zs.append(z)
            logp = logp + self._prior_logp(i, z, cond)
        return zs, logdet, logp

    def _prior_logp(self, i: int, z: Tensor, cond: Tensor | None) -> Tensor:
        if self.config.prior == "standard":
            return _standard_normal_logp(z)
        mean, log_std = self._prior(i).params(cond, z.shape[0])
        eps = (z - mean) * torch.exp(-log_std)
        return _standard_normal_logp(eps) - log_std.flatten(1).sum(1)

    def inverse(self, zs: list[Tensor]) -> Tensor:
        """The exact inverse: latents (as returned by forward) -> images."""
        if len(zs) != len(self.levels):
            raise ValueError(f"inverse needs {len(self.levels)} latents, got {len(zs)}")
        h: Tensor | None = None
        for i in reversed(range(len(self.levels))):
            z = zs[i]
            expected = self.latent_shapes[i]
            if tuple(z.shape[1:]) != expected:
                raise ValueError(f"latent {i} must have shape (B, {expected}), got {tuple(z.shape)}")
            h = z if h is None else torch.cat([h, z], dim=1)
            h, _ = self._level(i).inverse(h)
        assert h is not None  # a flow has at least one level
        return h

    def _level(self, i: int) -> FlowSequential:
        return cast(FlowSequential, self.levels[i])

    def _prior(self, i: int) -> LearnedPrior:
        return cast(LearnedPrior, self.priors[i])

    # ------------------------------------------------------------------ densities and samples

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) per sample, x the dequantised image in [−1, 1)."""
        _, logdet, logp = self(x)
        return logp + logdet

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """Per-sample bits/dim of the 8-bit image behind x (docs/design.md §3)."""
        return bits_per_dim(self.log_prob(x), self.config.dims)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n images in [−1, 1) (clamped), latents drawn at the given temperature."""
        device = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        h: Tensor | None = None
        for i in reversed(range(len(self.levels))):
            eps = torch.randn((n, *self.latent_shapes[i]), generator=generator, dtype=dtype).to(device)
            if self.config.prior == "standard":
                z = temperature * eps
            else:
                mean, log_std = self._prior(i).params(h, n)
                z = mean + temperature * torch.exp(log_std) * eps
            h = z if h is None else torch.cat([h, z], dim=1)
            h, _ = self._level(i).inverse(h)
        assert h is not None  # a flow has at least one level
        return h.clamp(-1, 1 - 1 / 256)

    def set_amp(self, amp: str | None) -> MultiScaleFlow:
        """Mixed precision: the coupling nets under torch.autocast (``"bf16"``/``"fp16"``), or None.

        The flow's own maths (1×1 convs, the matrix exponential and its series planning, every
        log-det) and the loss stay in float32. Returns the model.
        """
        set_amp(self, amp)
        return self

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent init (ActNorm and the coupling nets' norms) on one batch."""
        was_training = self.training
        self.train()
        self(x)
        self.train(was_training)


def build_step(config: FlowConfig, channels: int, size: tuple[int, int], net: NetFactory) -> list[FlowLayer]:
    """The layers of one flow step at a level of ``channels`` × ``size``, in the order of
    ``config.step``; every coupling's net from the factory ``net``."""
    layers: list[FlowLayer] = []
    for spec in config.step:
        if spec == "actnorm":
            layers.append(ActNorm(channels, per=config.actnorm, size=size))
        elif spec == "mixing":
            layers.append(MIXING.build(config.mixing, channels, size=size, **config.mixing_options))
        elif spec == "coupling":
            layers.append(COUPLING.build(config.coupling, channels, size=size, net=net, **config.coupling_options))
        elif "mixing" in spec:
            layers.append(MIXING.build(spec["mixing"], channels, size=size, **spec.get("options", {})))
        else:
            layers.append(COUPLING.build(spec["coupling"], channels, size=size, net=net, **spec.get("options", {})))
    return layers


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """bits/dim = −(log p(x) − D·ln 128) / (D·ln 2) for x scaled to [−1, 1) (docs/design.md §3)."""
    return -(log_prob - dims * math.log(128)) / (dims * math.log(2))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
