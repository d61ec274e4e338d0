import pytest
import torch
from PIL import Image

from mefbench.images import save_grid, to_uint8


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_grid(tmp_path, channels, mode):
    x = torch.linspace(-1, 1 - 1 / 256, 5 * channels * 8 * 8).reshape(5, channels, 8, 8)
    save_grid(x, tmp_path / "g.png", scale=8)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == mode
        # 3×2 grid of 8-px images with 1-px borders (28×19 px), upscaled ×8
        assert im.size == ((3 * 9 + 1) * 8, (2 * 9 + 1) * 8)


def test_to_uint8_inverts_dequantisation_levels():
    k = torch.arange(256, dtype=torch.float64)
    x = 2 * (k + 0.5) / 256 - 1
    assert torch.equal(to_uint8(x), k.to(torch.uint8))


def test_save_grid_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="1 or 3"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "g.png")
