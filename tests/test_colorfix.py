"""Colour fix (doc §4.6): wavelet reconstruction and AdaIN."""

from __future__ import annotations

import pytest
import torch

from supir_rt.colorfix import adain_color_fix, color_fix, wavelet_blur, wavelet_decomposition, wavelet_reconstruction

from formulas import direct_blur, direct_wavelet_fix, direct_wavelet_lowpass


def _image(seed: int, shape: tuple[int, ...] = (2, 3, 40, 36)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_wavelet_with_itself_as_style_is_identity() -> None:
    img = _image(0)
    torch.testing.assert_close(wavelet_reconstruction(img, img), img, atol=1e-5, rtol=0)


def test_wavelet_reconstruction_matches_direct_convolution() -> None:
    """Against the à-trous sum written out tap by tap (tests/formulas.py), on a non-square image
    smaller than the largest dilation (32 > 20 px), so the clamped borders matter everywhere."""
    content, style = _image(1, (2, 3, 20, 28)), _image(6, (2, 3, 20, 28)) * 0.5 + 0.1
    expected = torch.from_numpy(direct_wavelet_fix(content.numpy(), style.numpy()))
    torch.testing.assert_close(wavelet_reconstruction(content, style).double(), expected, atol=2e-6, rtol=0)
    high, low = wavelet_decomposition(content)
    torch.testing.assert_close(low.double(), torch.from_numpy(direct_wavelet_lowpass(content.numpy())), atol=2e-6, rtol=0)
    torch.testing.assert_close(high + low, content, atol=2e-6, rtol=0)


def test_wavelet_blur_matches_direct_convolution_at_every_radius() -> None:
    img = _image(7, (1, 2, 17, 23))
    for radius in (1, 2, 4, 8, 16):
        expected = torch.from_numpy(direct_blur(img.numpy(), radius))
        torch.testing.assert_close(wavelet_blur(img, radius).double(), expected, atol=1e-6, rtol=0)


def test_wavelet_transfers_low_frequencies_of_constants() -> None:
    content, style = _image(1, (1, 4, 32, 32)), torch.full((1, 4, 32, 32), 0.25)
    out = wavelet_reconstruction(content, style)  # a constant style's low band is itself
    expected = content.double() - torch.from_numpy(direct_wavelet_lowpass(content.numpy())) + 0.25
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)


def test_wavelet_blur_kernel_and_dilation() -> None:
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 4] = 16.0
    out = wavelet_blur(img, 2)
    expected = torch.zeros(1, 1, 9, 9)
    for dy, dx, w in [(-2, -2, 1), (-2, 0, 2), (-2, 2, 1), (0, -2, 2), (0, 0, 4), (0, 2, 2), (2, -2, 1), (2, 0, 2), (2, 2, 1)]:
        expected[0, 0, 4 + dy, 4 + dx] = w
    torch.testing.assert_close(out, expected)
    # replicate padding: a constant stays constant up to the border
    torch.testing.assert_close(wavelet_blur(torch.full((1, 2, 5, 5), 3.0), 4), torch.full((1, 2, 5, 5), 3.0))


def test_adain_matches_hand_formula() -> None:
    content, style = _image(2), _image(3) * 0.3 + 0.2
    out = adain_color_fix(content, style)
    for b in range(2):
        for c in range(3):
            x, s = content[b, c].double(), style[b, c].double()
            n = x.numel()
            mx, ms = x.sum() / n, s.sum() / n
            vx, vs = ((x - mx) ** 2).sum() / (n - 1), ((s - ms) ** 2).sum() / (n - 1)
            expected = (x - mx) / (vx + 1e-5).sqrt() * (vs + 1e-5).sqrt() + ms
            torch.testing.assert_close(out[b, c].double(), expected, atol=1e-5, rtol=0)


def test_color_fix_dispatch() -> None:
    content, style = _image(4), _image(5)
    assert torch.equal(color_fix(content, style, "none"), content)
    assert torch.equal(color_fix(content, style, "adain"), adain_color_fix(content, style))
    assert torch.equal(color_fix(content, style, "wavelet"), wavelet_reconstruction(content, style))
    with pytest.raises(ValueError, match="Wavelet"):
        color_fix(content, style, "Wavelet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        wavelet_reconstruction(content, style[..., :-1])
