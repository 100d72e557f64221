"""Tests for `hf_perfit.federated.comm`: mask packing, kept values and byte accounting."""

from __future__ import annotations

import math

import pytest
import torch

from hf_perfit.federated.comm import (
    downlink_bytes,
    kept_values,
    pack_mask,
    packed_mask_bytes,
    scatter_values,
    unpack_mask,
    uplink_bytes,
)
from hf_perfit.federated.messages import ClientInstruction, ClientUpdate

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    "shape", [(), (1,), (7,), (8,), (9,), (3, 5), (2, 3, 7), (16, 24), (0,), (4, 0, 3), (1, 1, 13)]
)
def test_pack_unpack_round_trip(shape):
    gen = torch.Generator().manual_seed(math.prod(shape) + len(shape))
    mask = torch.rand(shape, generator=gen) < 0.3
    data = pack_mask(mask)
    assert isinstance(data, bytes)
    assert len(data) == packed_mask_bytes(mask.numel()) == (mask.numel() + 7) // 8
    out = unpack_mask(data, shape)
    assert out.dtype == torch.bool
    assert tuple(out.shape) == tuple(shape)
    assert torch.equal(out, mask)


def test_pack_extremes_and_non_contiguous():
    full = torch.ones(5, 3, dtype=torch.bool)
    assert torch.equal(unpack_mask(pack_mask(full), (5, 3)), full)
    empty = torch.zeros(5, 3, dtype=torch.bool)
    assert pack_mask(empty) == bytes(2)
    t = (torch.arange(15).reshape(3, 5) % 3 == 0).T  # non-contiguous view
    assert torch.equal(unpack_mask(pack_mask(t), t.shape), t)


def test_unpack_wrong_length_raises():
    with pytest.raises(ValueError, match="packed mask"):
        unpack_mask(b"\x00\x00", (3, 7))  # 21 elements need 3 bytes


def test_kept_values_scatter_round_trip():
    gen = torch.Generator().manual_seed(0)
    tensors = {KEY_A: torch.randn(6, 10, generator=gen), KEY_B: torch.randn(12, 6, generator=gen)}
    masks = {k: torch.rand(t.shape, generator=gen) < 0.4 for k, t in tensors.items()}
    values = kept_values(tensors, masks)
    for k in tensors:
        assert values[k].dim() == 1 and values[k].numel() == int(masks[k].sum())
    dense = scatter_values(values, masks)
    for k, t in tensors.items():
        assert torch.equal(dense[k], torch.where(masks[k], t, 0.0))
        assert torch.equal(kept_values({k: dense[k]}, {k: masks[k]})[k], values[k])
    # explicit shapes with flat masks
    flat = {k: m.flatten() for k, m in masks.items()}
    dense2 = scatter_values(values, flat, {k: t.shape for k, t in tensors.items()})
    for k in tensors:
        assert torch.equal(dense2[k], dense[k])


def test_scatter_wrong_count_raises():
    mask = {KEY_A: torch.tensor([True, False, True])}
    with pytest.raises(ValueError, match="expected 2 kept values"):
        scatter_values({KEY_A: torch.ones(3)}, mask)
    with pytest.raises(ValueError, match="different keys"):
        scatter_values({KEY_B: torch.ones(2)}, mask)


def _quarter_mask(shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.arange(math.prod(shape)) % 4 == 0).reshape(shape)


def test_uplink_bytes_hand_example():
    shapes = {KEY_A: (16, 64), KEY_B: (64, 16)}  # 1024 elements each
    tensors = {k: torch.randn(s) for k, s in shapes.items()}
    dense = ClientUpdate("c0", 10, tensors)
    assert uplink_bytes(dense) == 2 * 1024 * 4
    assert uplink_bytes(dense, dtype_bytes=2) == 2 * 1024 * 2

    masks = {k: _quarter_mask(s) for k, s in shapes.items()}  # 25% density
    first = ClientUpdate("c0", 10, tensors, masks=masks, mask_changed=True)
    assert uplink_bytes(first) == 2 * (256 * 4 + 128)
    assert uplink_bytes(first) / uplink_bytes(dense) == pytest.approx(0.25 + 1 / 32, abs=0)
    later = ClientUpdate("c0", 10, tensors, masks=masks, mask_changed=False)
    assert uplink_bytes(later) == 2 * 256 * 4
    assert uplink_bytes(later) / uplink_bytes(dense) == 0.25

    extra = ClientUpdate("c0", 10, tensors, masks=masks, extra_tensors={"mean_embedding": torch.zeros(8)})
    assert uplink_bytes(extra) == 2 * 256 * 4 + 8 * 4


def test_uplink_packed_mask_rounds_up_per_tensor():
    masks = {KEY_A: torch.ones(3, 3, dtype=torch.bool), KEY_B: torch.zeros(1, 1, dtype=torch.bool)}
    tensors = {k: torch.zeros(m.shape) for k, m in masks.items()}
    up = ClientUpdate("c", 1, tensors, masks=masks, mask_changed=True)
    assert uplink_bytes(up) == 9 * 4 + 2 + 1


def test_downlink_bytes_hand_example():
    shapes = {KEY_A: (16, 64), KEY_B: (64, 16)}
    tensors = {k: torch.randn(s) for k, s in shapes.items()}
    masks = {k: _quarter_mask(s) for k, s in shapes.items()}
    assert downlink_bytes(ClientInstruction(tensors=None)) == 0
    assert downlink_bytes(ClientInstruction(tensors=tensors)) == 2 * 1024 * 4
    personal = ClientInstruction(tensors={k: torch.where(masks[k], t, 0.0) for k, t in tensors.items()}, mask=masks)
    assert downlink_bytes(personal) == 2 * 256 * 4
    assert downlink_bytes(personal, include_mask=True) == 2 * (256 * 4 + 128)
    assert downlink_bytes(personal, dtype_bytes=2) == 2 * 256 * 2
