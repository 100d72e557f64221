"""Converting hf_perfit's round messages to and from Flower records.

The in-process simulation passes [`ClientInstruction`] / [`ClientUpdate`] objects around; over Flower they travel as
`flwr.app.RecordDict`s built here. What goes on the wire is what [`hf_perfit.federated.comm`] accounts for:

- adapter tensors as `ArrayRecord`s of **float32** arrays (a bf16/fp16 adapter is cast up with `.float()`, which is
  exact; the receiving model casts back to its own dtype in `PerFITModel.set_adapter_state`);
- a PerFIT upload: only the **kept values** (1-D, the mask's row-major order, see [`~comm.kept_values`]) plus, when
  the mask changed, the mask **packed to one bit per element** ([`~comm.pack_mask`]) as `uint8` arrays;
- a PerFIT download restricted to the client's own mask: only the kept values plus a 64-character digest of the
  mask they belong to (the client holds the mask; the digest catches a client and server that disagree on it);
- counts, settings and metrics in `ConfigRecord` / `MetricRecord` (numbers and short strings, never data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from ..federated.comm import kept_values, pack_mask, scatter_values, unpack_mask
from ..federated.messages import ClientInstruction, ClientUpdate

__all__ = [
    "DENSE",
    "KEPT",
    "NONE",
    "OWN",
    "WIRE_DTYPE",
    "arrays_to_masks",
    "arrays_to_tensors",
    "check_tensor_shapes",
    "decode_instruction",
    "decode_tensors",
    "decode_update",
    "encode_instruction",
    "encode_tensors",
    "encode_update",
    "mask_digest",
    "array_bytes",
    "payload_bytes",
    "masks_to_arrays",
    "tensor_digest",
    "tensors_to_arrays",
    "zero_outside",
]

WIRE_DTYPE = torch.float32
"""Every floating-point adapter tensor travels as float32 (numpy has no bfloat16)."""

# How the tensors of a message are encoded (the `tensors-mode` config entry).
NONE = "none"  # no tensors ("keep your own adapter", or nothing to send)
DENSE = "dense"  # every element of every tensor
KEPT = "kept"  # PerFIT: the kept values of a mask the receiver holds or receives (1-D per tensor)
OWN = "own"  # evaluation: the personalized adapter is exactly the client's own last adapter, sent back as nothing

TENSORS = "tensors"
MASKS = "masks"
EXTRA = "extra"
META = "meta"
METRICS = "metrics"


# ---------------------------------------------------------------------- tensors and masks


def tensors_to_arrays(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """A `dict[str, Tensor]` as an `ArrayRecord`, floating-point tensors cast to float32 on the wire.

    Args:
        tensors (`Mapping[str, Tensor]`): tensors on any device and dtype; boolean tensors are refused (send masks
            with [`masks_to_arrays`]).

    Returns:
        `ArrayRecord`: one numpy-serialized `Array` per key, in the mapping's order.
    """
    record = ArrayRecord()
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{key!r} is a {type(t).__name__}, expected a torch.Tensor.")
        if t.dtype == torch.bool:
            raise TypeError(f"{key!r} is a boolean tensor: send masks with masks_to_arrays (packed bits).")
        t = t.detach().to("cpu")
        if t.is_floating_point() and t.dtype != WIRE_DTYPE:
            t = t.to(WIRE_DTYPE)
        record[key] = Array(t.contiguous().numpy())
    return record


def arrays_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """Inverse of [`tensors_to_arrays`]: CPU tensors (float32 for floating-point data), in the record's order."""
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()}


def masks_to_arrays(masks: Mapping[str, Tensor]) -> ArrayRecord:
    """Boolean masks as packed bits (`ceil(numel / 8)` bytes each, [`~comm.pack_mask`]) in `uint8` arrays."""
    record = ArrayRecord()
    for key, m in masks.items():
        record[key] = Array(np.frombuffer(pack_mask(m), dtype=np.uint8).copy())
    return record


def arrays_to_masks(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Inverse of [`masks_to_arrays`], given each mask's shape (the adapter tensor's shape).

    Raises:
        ValueError: on a key without a known shape or a packed mask of the wrong size.
    """
    out = {}
    for key, array in record.items():
        if key not in shapes:
            raise ValueError(f"mask {key!r} does not belong to the adapter (known keys: {list(shapes)[:3]}...).")
        out[key] = unpack_mask(array.numpy().tobytes(), shapes[key])
    return out


def mask_digest(masks: Mapping[str, Tensor]) -> str:
    """SHA-256 of the packed bits of `masks` (keys in sorted order): equal masks, equal digests."""
    h = hashlib.sha256()
    for key in sorted(masks):
        h.update(key.encode())
        h.update(pack_mask(masks[key]))
    return h.hexdigest()


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the float32 bytes and shapes of `tensors` (keys in sorted order): a bit-exact fingerprint."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu", WIRE_DTYPE).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message's content (data plus numpy headers and keys, `ArrayRecord.count_bytes`):
    what the tensors and masks actually cost on the wire, next to the [`comm`] accounting."""
    return sum(record.count_bytes() for record in content.array_records.values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the array *data* in a message's content (elements × item size, without numpy headers and keys): for
    an upload it equals [`~comm.uplink_bytes`], for a download [`~comm.downlink_bytes`] (float32 on the wire)."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    return total


def zero_outside(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> bool:
    """Whether every tensor is exactly 0.0 outside its mask (so its kept values alone describe it)."""
    if set(tensors) != set(masks):
        return False
    for key, t in tensors.items():
        m = masks[key]
        if tuple(t.shape) != tuple(m.shape) or bool((t.detach().to("cpu")[~m.to("cpu", torch.bool)] != 0).any()):
            return False
    return True


def check_tensor_shapes(
    what: str, tensors: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], complete: bool = True
) -> None:
    """Raise `ValueError` unless every key of `tensors` is in `shapes` with that shape, and (`complete=True`) every
    key of `shapes` is present. Strategies that exchange part of the adapter (FedAMoLE: a client's experts only) are
    checked with `complete=False`; the strategy checks the rest."""
    extra = sorted(set(tensors) - set(shapes))
    missing = sorted(set(shapes) - set(tensors)) if complete else []
    if extra or missing:
        raise ValueError(f"{what} do not fit the adapter: missing {missing[:3]}, unexpected {extra[:3]}.")
    for key, t in tensors.items():
        shape = shapes[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{what}: {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}.")


def encode_tensors(
    content: RecordDict, meta: ConfigRecord, tensors: Mapping[str, Tensor] | None, masks: Mapping[str, Tensor] | None
) -> None:
    """Put `tensors` into `content` as kept values of `masks` (when given and the tensors are zero outside them) or
    dense, and record the mode (and the mask digest) in `meta`. `tensors=None` records mode `none`."""
    if tensors is None:
        meta["tensors-mode"] = NONE
        return
    if masks is not None and zero_outside(tensors, masks):
        meta["tensors-mode"] = KEPT
        meta["mask-digest"] = mask_digest(masks)
        content[TENSORS] = tensors_to_arrays(kept_values(tensors, masks))
    else:
        meta["tensors-mode"] = DENSE
        content[TENSORS] = tensors_to_arrays(tensors)


def decode_tensors(
    content: RecordDict, meta: Mapping[str, Any], masks: Mapping[str, Tensor] | None, what: str
) -> dict[str, Tensor] | None:
    """Inverse of [`encode_tensors`]: dense float32 tensors, or `None` for mode `none` (and `own`).

    Args:
        content: the message content.
        meta: its `meta` config record.
        masks: the masks kept values belong to (the receiver's copy); needed for mode `kept`.
        what: names the tensors in error messages.

    Raises:
        ValueError: kept values without masks, or masks whose digest differs from the sender's.
    """
    mode = meta.get("tensors-mode", NONE)
    if mode in (NONE, OWN):
        return None
    values = arrays_to_tensors(content[TENSORS])
    if mode == DENSE:
        return values
    if mode != KEPT:
        raise ValueError(f"{what}: unknown tensors-mode {mode!r}.")
    if masks is None:
        raise ValueError(f"{what} carry kept values only, but the receiver holds no mask for them.")
    if mask_digest(masks) != meta.get("mask-digest"):
        raise ValueError(
            f"{what} carry the kept values of a mask that differs from the receiver's own (digest mismatch): the "
            "client and the server disagree on this client's PerFIT mask."
        )
    return scatter_values(values, masks)


# ---------------------------------------------------------------------- round messages


def encode_instruction(instruction: ClientInstruction, config: Mapping[str, Any] | None = None) -> RecordDict:
    """A [`ClientInstruction`] as message content: `instruction.tensors` as kept values of `instruction.mask` when it
    has one (the client's own, which it holds), else dense; `instruction.config` as JSON; plus `config` (round
    settings: scalars and strings) in the same `meta` record."""
    content = RecordDict()
    meta = ConfigRecord(dict(config or {}))
    meta["instruction-config"] = json.dumps(instruction.config, sort_keys=True)
    # the run's seeded initial adapter: the client rebuilds it from the run config, nothing travels (docs/perfit.md)
    seeded = bool(instruction.config.get("seeded_init"))
    encode_tensors(content, meta, None if seeded else instruction.tensors, instruction.mask)
    content[META] = meta
    return content


def decode_instruction(content: RecordDict, own_masks: Mapping[str, Tensor] | None) -> ClientInstruction:
    """Inverse of [`encode_instruction`] on the client, which supplies its own mask (`None` before its search).

    The instruction's `mask` is the client's mask when the server sent kept values (exactly as the server's strategy
    built it), else `None`.
    """
    meta = content[META]
    tensors = decode_tensors(content, meta, own_masks, "the server's instruction tensors")
    mask = dict(own_masks) if meta.get("tensors-mode") == KEPT and own_masks is not None else None
    return ClientInstruction(tensors=tensors, mask=mask, config=json.loads(str(meta["instruction-config"])))


def encode_update(update: ClientUpdate, metrics: Mapping[str, float | int] | None = None) -> RecordDict:
    """A [`ClientUpdate`] as message content: with masks (PerFIT after its search) only the kept values, plus the
    packed mask when `update.mask_changed`; without, dense tensors. `update.extra_tensors` go dense;
    `update.metrics` and `metrics` (round bookkeeping) go into metric records."""
    content = RecordDict()
    meta = ConfigRecord({"client-id": update.client_id, "mask-changed": bool(update.mask_changed)})
    encode_tensors(content, meta, update.tensors, update.masks)
    if update.masks is not None and update.mask_changed:
        content[MASKS] = masks_to_arrays(update.masks)
    if update.extra_tensors:
        content[EXTRA] = tensors_to_arrays(update.extra_tensors)
    content[META] = meta
    content[METRICS] = MetricRecord({"num-examples": int(update.num_examples), **dict(metrics or {})})
    content["update-metrics"] = MetricRecord({k: float(v) for k, v in update.metrics.items()})
    return content


def decode_update(
    content: RecordDict,
    shapes: Mapping[str, tuple[int, ...]],
    known_masks: Mapping[str, Tensor] | None,
) -> ClientUpdate:
    """Inverse of [`encode_update`] on the server: dense tensors (zeros outside the mask) with their mask.

    Args:
        content: the reply's content.
        shapes: the adapter's tensor shapes (the global adapter's), to unpack masks and check the upload.
        known_masks: the mask the server sent this client's kept values on this round (`ClientInstruction.mask`),
            used when the client kept its mask and sent only values.

    Raises:
        ValueError: a malformed upload (unknown or missing keys, wrong shapes, mask digest mismatch).
    """
    meta = content[META]
    client_id = str(meta["client-id"])
    mask_changed = bool(meta.get("mask-changed", False))
    masks: dict[str, Tensor] | None = None
    if MASKS in content.array_records:
        masks = arrays_to_masks(content[MASKS], shapes)
        check_tensor_shapes(f"client {client_id!r}: masks", masks, shapes)
    elif meta.get("tensors-mode") == KEPT:
        masks = None if known_masks is None else dict(known_masks)
    tensors = decode_tensors(content, meta, masks, f"client {client_id!r}'s upload")
    if tensors is None:
        raise ValueError(f"client {client_id!r} uploaded no tensors.")
    check_tensor_shapes(f"client {client_id!r}: tensors", tensors, shapes, complete=False)
    extra = arrays_to_tensors(content[EXTRA]) if EXTRA in content.array_records else {}
    counts = content[METRICS]
    return ClientUpdate(
        client_id=client_id,
        num_examples=int(counts["num-examples"]),
        tensors=tensors,
        masks=masks,
        mask_changed=mask_changed,
        metrics={k: float(v) for k, v in content["update-metrics"].items()},
        extra_tensors=extra,
    )
