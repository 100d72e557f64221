"""Communication helpers: bit-packed masks, kept-values (de)serialisation and byte accounting.

The simulation exchanges dense tensors for simplicity; these functions say what a real deployment sends. Dense
tensors cost `numel · dtype_bytes`. A PerFIT upload sends only the kept values (`kept · dtype_bytes`) plus, when the
mask changed, the mask packed to one bit per element (`ceil(numel / 8)` bytes per tensor). A PerFIT download restricted
to a mask the client already holds sends only the kept values. Scalars (`num_examples`, metrics, config) are not
counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .messages import ClientInstruction, ClientUpdate

__all__ = [
    "downlink_bytes",
    "kept_values",
    "packed_mask_bytes",
    "pack_mask",
    "scatter_values",
    "unpack_mask",
    "uplink_bytes",
]


def packed_mask_bytes(numel: int) -> int:
    """Size in bytes of a packed mask of `numel` elements: `ceil(numel / 8)`."""
    return (int(numel) + 7) // 8


def pack_mask(mask: Tensor) -> bytes:
    """Pack a boolean mask to one bit per element (row-major order, `numpy.packbits`, big-endian bit order).

    Args:
        mask (`torch.BoolTensor`): the mask, any shape and device. Non-boolean tensors are read as `mask != 0`.

    Returns:
        `bytes`: `ceil(mask.numel() / 8)` bytes; the shape is not stored (pass it to [`unpack_mask`]).
    """
    flat = mask.detach().reshape(-1).cpu()
    flat = flat if flat.dtype == torch.bool else flat != 0
    return np.packbits(flat.numpy()).tobytes()


def unpack_mask(data: bytes, shape: Sequence[int] | torch.Size) -> Tensor:
    """Inverse of [`pack_mask`]: exact round trip for any shape.

    Args:
        data (`bytes`): the packed bits.
        shape (`Sequence[int]`): the mask's shape.

    Returns:
        `torch.BoolTensor` of `shape`, on CPU.

    Raises:
        ValueError: if `data` does not have `ceil(numel / 8)` bytes.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if len(data) != packed_mask_bytes(numel):
        raise ValueError(
            f"a packed mask of shape {shape} has {packed_mask_bytes(numel)} bytes, got {len(data)}: wrong shape or "
            "truncated data."
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=numel).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def kept_values(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The kept values of each tensor, as 1-D tensors in the mask's row-major order (what a PerFIT client sends).

    Args:
        tensors (`Mapping[str, Tensor]`): dense tensors.
        masks (`Mapping[str, Tensor]`): boolean masks with the same keys and shapes.

    Returns:
        `dict[str, Tensor]`: `{key: tensors[key][masks[key]]}`, 1-D, same dtype as the tensors.
    """
    _check_same_keys(tensors, masks, "tensors", "masks")
    out = {}
    for key, t in tensors.items():
        m = masks[key]
        if tuple(t.shape) != tuple(m.shape):
            raise ValueError(f"{key}: tensor shape {tuple(t.shape)} differs from mask shape {tuple(m.shape)}.")
        out[key] = t.detach()[m.to(device=t.device, dtype=torch.bool)].clone()
    return out


def scatter_values(
    values: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Tensor]:
    """Inverse of [`kept_values`]: dense tensors with `values` at the kept positions and exactly 0.0 elsewhere.

    Args:
        values (`Mapping[str, Tensor]`): 1-D kept values per key.
        masks (`Mapping[str, Tensor]`): the boolean masks the values were taken with.
        shapes (`Mapping[str, Sequence[int]]`, *optional*): the dense shapes; defaults to the masks' shapes. Given,
            each must have as many elements as its mask (flat masks are reshaped to it).

    Returns:
        `dict[str, Tensor]`: dense tensors, dtype and device of `values`.
    """
    _check_same_keys(values, masks, "values", "masks")
    out = {}
    for key, v in values.items():
        m = masks[key].to(dtype=torch.bool)
        shape = tuple(m.shape) if shapes is None else tuple(int(s) for s in shapes[key])
        if math.prod(shape) != m.numel():
            raise ValueError(f"{key}: shape {shape} does not fit a mask of {m.numel()} elements.")
        m = m.reshape(shape).to(v.device)
        kept = int(m.sum())
        if v.dim() != 1 or v.numel() != kept:
            raise ValueError(f"{key}: expected {kept} kept values (1-D), got shape {tuple(v.shape)}.")
        dense = torch.zeros(shape, dtype=v.dtype, device=v.device)
        dense[m] = v
        out[key] = dense
    return out


def uplink_bytes(update: ClientUpdate, dtype_bytes: int = 4) -> int:
    """Bytes a real deployment uploads for `update`.

    Without masks: every tensor dense (`numel · dtype_bytes`). With masks (PerFIT): the kept values only
    (`kept · dtype_bytes`), plus `ceil(numel / 8)` bytes per tensor for the packed mask when `update.mask_changed`.
    `update.extra_tensors` are counted dense.

    Args:
        update ([`ClientUpdate`]): the upload.
        dtype_bytes (`int`, defaults to 4): bytes per value on the wire (4 for float32, 2 for bfloat16).

    Returns:
        `int`: number of bytes.
    """
    if update.masks is None:
        total = _dense_bytes(update.tensors, dtype_bytes)
    else:
        if update.tensors:
            _check_same_keys(update.tensors, update.masks, "tensors", "masks")
        total = sum(int(update.masks[k].sum()) * dtype_bytes for k in update.tensors)
        if update.mask_changed:
            total += sum(packed_mask_bytes(m.numel()) for m in update.masks.values())
    return total + _dense_bytes(update.extra_tensors, dtype_bytes)


def downlink_bytes(instruction: ClientInstruction, dtype_bytes: int = 4, include_mask: bool = False) -> int:
    """Bytes a real deployment downloads for `instruction`.

    `tensors=None` costs nothing, and so does `config["seeded_init"]` (the run's seeded initial adapter, which the
    client rebuilds from the seed; PerFIT's first round, docs/perfit.md). With a mask (PerFIT: the client's own, which it already holds) only the kept values
    are sent (`kept · dtype_bytes`); without one the tensors are dense.

    Args:
        instruction ([`ClientInstruction`]): the download.
        dtype_bytes (`int`, defaults to 4): bytes per value on the wire.
        include_mask (`bool`, defaults to `False`): also count the packed mask (for a client that does not hold it).

    Returns:
        `int`: number of bytes.
    """
    if instruction.tensors is None or instruction.config.get("seeded_init"):
        return 0
    if instruction.mask is None:
        return _dense_bytes(instruction.tensors, dtype_bytes)
    _check_same_keys(instruction.tensors, instruction.mask, "tensors", "mask")
    total = sum(int(m.sum()) * dtype_bytes for m in instruction.mask.values())
    if include_mask:
        total += sum(packed_mask_bytes(m.numel()) for m in instruction.mask.values())
    return total


def _dense_bytes(tensors: Mapping[str, Tensor], dtype_bytes: int) -> int:
    return sum(t.numel() for t in tensors.values()) * dtype_bytes


def _check_same_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor], name_a: str, name_b: str) -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"{name_a} and {name_b} have different keys: only in {name_a} {only_a[:3]}, only in {name_b} {only_b[:3]}."
        )
