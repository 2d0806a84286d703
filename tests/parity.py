"""The one tolerance every comparison against a reference fixture uses.

A float32 result computed by other kernels (another CPU's SIMD width, another summation order) differs
from the reference by a few rounding steps of the values it was summed from, so the allowed error grows
with the magnitude: |ours - ref| <= ATOL + RTOL * |ref| elementwise. RTOL = 2e-6 is about 17 float32 ulps
(2**-23 = 1.19e-7), ATOL = 1e-5 covers values near zero that come out of cancelling larger terms.
Integer outputs (ranks, indices, answer ids, labels) must be equal.
"""

from __future__ import annotations

import torch

ATOL = 1e-5
RTOL = 2e-6


def parity_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| / (ATOL + RTOL * |want|): <= 1 means within tolerance."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not want.numel():
        return 0.0
    ratio = (got - want).abs() / (ATOL + RTOL * want.abs())
    return float("inf") if ratio.isnan().any() else ratio.max().item()


def assert_matches_reference(name: str, got, want) -> None:
    """Shapes equal; integer tensors exactly equal; floating ones within ATOL + RTOL * |want|."""
    want = want if torch.is_tensor(want) else torch.tensor(want)
    got = got if torch.is_tensor(got) else torch.tensor(got)
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if not want.is_floating_point():
        assert not got.is_floating_point(), f"{name}: floating output where the reference has {want.dtype}"
        assert torch.equal(got.cpu().long(), want.long()), f"{name}: {got.tolist()} != reference {want.tolist()}"
        return
    err = parity_error(got, want)
    worst = ((got.detach().double().cpu() - want.double()).abs().max().item()) if want.numel() else 0.0
    assert err <= 1.0, (
        f"{name}: max abs error {worst:.3g} exceeds {ATOL:g} + {RTOL:g}*|ref| "
        f"(worst element at {err:.2f}x its tolerance)"
    )
