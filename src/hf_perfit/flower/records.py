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

Packed messages (`pack=True`; the stock ServerApp's default, `FlowerRunOptions.pack_arrays`): Flower 1.41 moves every
record, `Array` and array chunk of a message as its own object (one HTTP request per object and hop: ServerApp ->
SuperLink -> SuperNode -> ClientApp, and back), so an adapter of 8 tensors costs some 20 requests per hop. A packed
message carries all its tensor groups (`tensors`, `masks`, `extra`) as **one** safetensors blob of the same float32
values and mask bits, bit for bit, whose one metadata entry lists the groups and keys in order ([`pack_blob`] /
[`unpack_blob`]). A blob of at most [`INLINE_LIMIT`] bytes travels as a `bytes` entry `packed-tensors` of the
message's `meta` `ConfigRecord` (no object of its own); a larger one as **one** `ArrayRecord` `packed` holding
**one** `uint8` array ([`pack_arrays`] / [`unpack_arrays`]), which Flower cuts into chunks of 5 MB. The receiver
reads both, and answers in the format it was asked in (the `pack-arrays` entry of the request's `meta`). Unpacked messages (one `Array` per tensor) remain for
Flower mods and strategy wrappers that read a message's arrays key by key (`fixedclipping_mod` and the DP wrappers:
`HFPerFITStrategy`'s default).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from ..federated.comm import kept_values, pack_mask, scatter_values, unpack_mask
from ..federated.messages import ClientInstruction, ClientUpdate

__all__ = [
    "DENSE",
    "INLINE_LIMIT",
    "KEPT",
    "NONE",
    "OWN",
    "PACKED",
    "PACKED_ENTRY",
    "PACK_FLAG",
    "UPDATE_METRIC",
    "WIRE_DTYPE",
    "array_bytes",
    "arrays_to_masks",
    "arrays_to_tensors",
    "bits_to_masks",
    "check_tensor_shapes",
    "decode_instruction",
    "decode_tensors",
    "decode_update",
    "encode_instruction",
    "encode_tensors",
    "encode_update",
    "get_arrays",
    "mask_digest",
    "masks_to_arrays",
    "pack_arrays",
    "pack_blob",
    "payload_bytes",
    "put_arrays",
    "tensor_digest",
    "tensors_to_arrays",
    "unpack_arrays",
    "unpack_blob",
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
PACKED = "packed"
"""The one `ArrayRecord` of a packed message whose blob is larger than [`INLINE_LIMIT`] (see the module docstring)."""
PACKED_ENTRY = "packed-tensors"
"""The `bytes` entry of a `meta` `ConfigRecord` holding a packed message's blob (up to [`INLINE_LIMIT`] bytes)."""
INLINE_LIMIT = 4 * 1024 * 1024
"""The largest blob that travels inside `meta` (4 MiB): below Flower 1.41's 5 MB array chunks, so no object of a
packed message is larger than Flower's own largest. Each object it saves is one HTTP request per hop: a `train`
message goes from 6 objects to 3, its reply from 8 to 5 (`docs/flower.md`, section 2)."""
UPDATE_METRIC = "update/"
"""Prefix of a [`ClientUpdate`]'s own metrics in the reply's `metrics` record (one record: one object less on the
wire than a record of their own)."""
PACK_FLAG = "pack-arrays"
"""`meta` entry of a request: `True` asks the receiver to pack the arrays of its reply."""
_LAYOUT = "layout"  # the packed blob's one metadata key: [[group, [key, ...]], ...], in order


# ---------------------------------------------------------------------- tensors and masks


def _wire_tensor(key: str, t: Tensor) -> Tensor:
    """`t` as it travels: on CPU, contiguous, floating point as float32; booleans refused."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{key!r} is a {type(t).__name__}, expected a torch.Tensor.")
    if t.dtype == torch.bool:
        raise TypeError(f"{key!r} is a boolean tensor: send masks with masks_to_arrays (packed bits).")
    t = t.detach().to("cpu")
    if t.is_floating_point() and t.dtype != WIRE_DTYPE:
        t = t.to(WIRE_DTYPE)
    return t.contiguous()


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
        record[key] = Array(_wire_tensor(key, t).numpy())
    return record


def arrays_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """Inverse of [`tensors_to_arrays`]: CPU tensors (float32 for floating-point data), in the record's order."""
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()}


def pack_blob(groups: Mapping[str, Mapping[str, Tensor]]) -> bytes:
    """Named groups of tensors as **one** safetensors blob.

    The values are those [`tensors_to_arrays`] would send (float32 for floating point, other dtypes as they are),
    byte for byte; the blob's one metadata entry lists the groups and their keys in order, so [`unpack_blob`]
    returns the same groups, keys, order, dtypes, shapes and bits (empty groups included).

    Args:
        groups (`Mapping[str, Mapping[str, Tensor]]`): e.g. `{"tensors": {...}, "masks": {...}}`.
    """
    layout = [[str(group), [str(key) for key in tensors]] for group, tensors in groups.items()]
    flat = {
        f"{g}/{key}": _wire_tensor(key, t).clone()  # own storage: safetensors refuses tensors that share memory
        for g, tensors in enumerate(groups.values())
        for key, t in tensors.items()
    }
    return _st_save(flat, metadata={_LAYOUT: json.dumps(layout)})


def pack_arrays(groups: Mapping[str, Mapping[str, Tensor]]) -> ArrayRecord:
    """[`pack_blob`] as **one** `ArrayRecord` holding **one** `uint8` array (how a blob larger than
    [`INLINE_LIMIT`] travels).

    Returns:
        `ArrayRecord`: `{"packed": Array(uint8, 1-D)}`.
    """
    record = ArrayRecord()
    record[PACKED] = Array(np.frombuffer(pack_blob(groups), dtype=np.uint8).copy())
    return record


def _blob_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors blob (an 8-byte little-endian length, then the JSON)."""
    if len(blob) < 8:
        raise ValueError("the packed array is not a safetensors blob (shorter than its 8-byte header length).")
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        return json.loads(blob[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the packed array is not a safetensors blob ({err}).") from None


def unpack_blob(blob: bytes) -> dict[str, dict[str, Tensor]]:
    """Inverse of [`pack_blob`]: the groups of tensors (CPU), in the sender's order.

    Raises:
        ValueError: a blob without hf_perfit's layout (or not a safetensors blob at all).
    """
    try:
        layout = json.loads(_blob_header(blob)["__metadata__"][_LAYOUT])
        flat = _st_load(blob)
        return {group: {key: flat[f"{g}/{key}"] for key in keys} for g, (group, keys) in enumerate(layout)}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the packed array does not hold hf_perfit's tensor layout ({err!r}).") from None


def unpack_arrays(record: ArrayRecord) -> dict[str, dict[str, Tensor]]:
    """Inverse of [`pack_arrays`]: the groups of tensors (CPU), in the sender's order.

    Raises:
        ValueError: a record that is not one packed 1-D uint8 array, or a blob without hf_perfit's layout.
    """
    if list(record.keys()) != [PACKED]:
        raise ValueError(f"a packed record holds exactly one array {PACKED!r}, got {list(record.keys())[:3]}.")
    array = record[PACKED]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise ValueError(f"the packed array must be 1-D uint8, got {array.dtype} of shape {tuple(array.shape)}.")
    return unpack_blob(array.numpy().tobytes())


def put_arrays(
    content: RecordDict,
    groups: Mapping[str, Mapping[str, Tensor]],
    pack: bool,
    meta: ConfigRecord | None = None,
) -> None:
    """Put tensor groups into a message's content: one `ArrayRecord` per group, or (`pack=True`) all of them in one
    blob ([`pack_blob`]): up to [`INLINE_LIMIT`] bytes as the `packed-tensors` entry of `meta` (the message's `meta`
    record, which the caller stores in `content`; without one, a `ConfigRecord` `packed` of its own), larger as the
    `packed` `ArrayRecord`. Mask bits travel as `uint8` tensors."""
    if not pack:
        for group, tensors in groups.items():
            content[group] = tensors_to_arrays(tensors)
        return
    blob = pack_blob(groups)
    if len(blob) > INLINE_LIMIT:
        content[PACKED] = ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8).copy())})
    elif meta is not None:
        meta[PACKED_ENTRY] = blob
    else:
        content[PACKED] = ConfigRecord({PACKED_ENTRY: blob})


def _inline_blob(content: RecordDict) -> bytes | None:
    for name in (META, PACKED):
        record = content.config_records.get(name)
        if record is not None and PACKED_ENTRY in record:
            return bytes(record[PACKED_ENTRY])
    return None


def get_arrays(content: RecordDict) -> dict[str, dict[str, Tensor]]:
    """Inverse of [`put_arrays`]: a message's tensor groups (CPU tensors), packed (inline or not) or not."""
    blob = _inline_blob(content)
    if blob is not None:
        return unpack_blob(blob)
    records = content.array_records
    if PACKED in records:
        return unpack_arrays(records[PACKED])
    return {group: arrays_to_tensors(record) for group, record in records.items()}


def _mask_bits(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks as packed bits, one `uint8` tensor of `ceil(numel / 8)` bytes each ([`~comm.pack_mask`])."""
    return {key: torch.from_numpy(np.frombuffer(pack_mask(m), dtype=np.uint8).copy()) for key, m in masks.items()}


def masks_to_arrays(masks: Mapping[str, Tensor]) -> ArrayRecord:
    """Boolean masks as packed bits (`ceil(numel / 8)` bytes each, [`~comm.pack_mask`]) in `uint8` arrays."""
    return tensors_to_arrays(_mask_bits(masks))


def bits_to_masks(bits: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Packed mask bits (`uint8` tensors) back to boolean masks, given each mask's shape (the adapter tensor's).

    Raises:
        ValueError: on a key without a known shape or a packed mask of the wrong size.
    """
    out = {}
    for key, b in bits.items():
        if key not in shapes:
            raise ValueError(f"mask {key!r} does not belong to the adapter (known keys: {list(shapes)[:3]}...).")
        out[key] = unpack_mask(b.numpy().tobytes(), shapes[key])
    return out


def arrays_to_masks(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Inverse of [`masks_to_arrays`], given each mask's shape (the adapter tensor's shape).

    Raises:
        ValueError: on a key without a known shape or a packed mask of the wrong size.
    """
    return bits_to_masks(arrays_to_tensors(record), shapes)


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
    """Bytes of the arrays in a message's content (data plus numpy headers and keys, `ArrayRecord.count_bytes`; for a
    packed message its blob, safetensors header included, plus its key): what the tensors and masks actually cost on
    the wire, next to the [`comm`] accounting."""
    blob = _inline_blob(content)
    inline = 0 if blob is None else len(blob) + len(PACKED_ENTRY)  # as `ArrayRecord.count_bytes` counts a key
    return inline + sum(record.count_bytes() for record in content.array_records.values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the array *data* in a message's content (elements × item size, without numpy or safetensors headers
    and keys), packed or not: for an upload it equals [`~comm.uplink_bytes`], for a download [`~comm.downlink_bytes`]
    (float32 on the wire)."""
    return sum(t.numel() * t.element_size() for group in get_arrays(content).values() for t in group.values())


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


def _tensor_group(
    meta: ConfigRecord, tensors: Mapping[str, Tensor] | None, masks: Mapping[str, Tensor] | None
) -> dict[str, Tensor] | None:
    """What [`encode_tensors`] sends (kept values, dense tensors, or `None`), recording the mode in `meta`."""
    if tensors is None:
        meta["tensors-mode"] = NONE
        return None
    if masks is not None and zero_outside(tensors, masks):
        meta["tensors-mode"] = KEPT
        meta["mask-digest"] = mask_digest(masks)
        return kept_values(tensors, masks)
    meta["tensors-mode"] = DENSE
    return dict(tensors)


def encode_tensors(
    content: RecordDict,
    meta: ConfigRecord,
    tensors: Mapping[str, Tensor] | None,
    masks: Mapping[str, Tensor] | None,
    pack: bool = False,
) -> None:
    """Put `tensors` into `content` as kept values of `masks` (when given and the tensors are zero outside them) or
    dense, and record the mode (and the mask digest) in `meta`. `tensors=None` records mode `none`. `pack=True`:
    in one packed blob, inside `meta` when small ([`put_arrays`]); the caller stores `meta` in `content` after."""
    group = _tensor_group(meta, tensors, masks)
    if group is not None:
        put_arrays(content, {TENSORS: group}, pack, meta=meta)


def decode_tensors(
    content: RecordDict, meta: Mapping[str, Any], masks: Mapping[str, Tensor] | None, what: str
) -> dict[str, Tensor] | None:
    """Inverse of [`encode_tensors`] (packed or not): dense float32 tensors, or `None` for mode `none` (and `own`).

    Args:
        content: the message content.
        meta: its `meta` config record.
        masks: the masks kept values belong to (the receiver's copy); needed for mode `kept`.
        what: names the tensors in error messages.

    Raises:
        ValueError: kept values without masks, or masks whose digest differs from the sender's.
    """
    if meta.get("tensors-mode", NONE) in (NONE, OWN):
        return None
    return _decode_tensors(get_arrays(content), meta, masks, what)


def _decode_tensors(
    groups: Mapping[str, Mapping[str, Tensor]], meta: Mapping[str, Any], masks: Mapping[str, Tensor] | None, what: str
) -> dict[str, Tensor] | None:
    mode = meta.get("tensors-mode", NONE)
    if mode in (NONE, OWN):
        return None
    if TENSORS not in groups:
        raise ValueError(f"{what}: the message says tensors-mode {mode!r} but carries no tensors.")
    values = dict(groups[TENSORS])
    if mode == DENSE:
        return values
    if mode != KEPT:
        raise ValueError(f"{what}: unknown tensors-mode {mode!r}.")
    if masks is None:
        raise ValueError(f"{what} carry kept values only, but the receiver holds no mask for them.")
    if set(values) < set(masks):  # part of the adapter (PerFIT's personal_b: A only): the masks of those tensors
        masks = {k: masks[k] for k in values}
    if mask_digest(masks) != meta.get("mask-digest"):
        raise ValueError(
            f"{what} carry the kept values of a mask that differs from the receiver's own (digest mismatch): the "
            "client and the server disagree on this client's PerFIT mask."
        )
    return scatter_values(values, masks)


# ---------------------------------------------------------------------- round messages


def encode_instruction(
    instruction: ClientInstruction, config: Mapping[str, Any] | None = None, pack: bool = False
) -> RecordDict:
    """A [`ClientInstruction`] as message content: `instruction.tensors` as kept values of `instruction.mask` when it
    has one (the client's own, which it holds), else dense; `instruction.config` as JSON; plus `config` (round
    settings: scalars and strings) in the same `meta` record. `pack=True`: the tensors in one packed blob, and the
    client is asked to pack its reply (`pack-arrays`)."""
    content = RecordDict()
    meta = ConfigRecord(dict(config or {}))
    meta["instruction-config"] = json.dumps(instruction.config, sort_keys=True)
    meta[PACK_FLAG] = bool(pack)
    # the run's seeded initial adapter: the client rebuilds it from the run config, nothing travels (docs/perfit.md)
    seeded = bool(instruction.config.get("seeded_init"))
    encode_tensors(content, meta, None if seeded else instruction.tensors, instruction.mask, pack=pack)
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
    if mask is not None and tensors is not None:  # the masks of the tensors sent (all, or A only with personal_b)
        mask = {k: mask[k] for k in tensors}
    return ClientInstruction(tensors=tensors, mask=mask, config=json.loads(str(meta["instruction-config"])))


def encode_update(
    update: ClientUpdate, metrics: Mapping[str, float | int] | None = None, pack: bool = False
) -> RecordDict:
    """A [`ClientUpdate`] as message content: with masks (PerFIT after its search) only the kept values, plus the
    packed mask when `update.mask_changed`; without, dense tensors. `update.extra_tensors` go dense;
    `metrics` (round bookkeeping) and `update.metrics` (prefixed `update/`) go into the `metrics` record.
    `pack=True`: every tensor group in one packed blob ([`put_arrays`])."""
    content = RecordDict()
    meta = ConfigRecord({"client-id": update.client_id, "mask-changed": bool(update.mask_changed)})
    groups: dict[str, dict[str, Tensor]] = {}
    tensors = _tensor_group(meta, update.tensors, update.masks)
    if tensors is not None:
        groups[TENSORS] = tensors
    if update.masks is not None and update.mask_changed:
        groups[MASKS] = _mask_bits(update.masks)
    if update.extra_tensors:
        groups[EXTRA] = dict(update.extra_tensors)
    put_arrays(content, groups, pack, meta=meta)
    content[META] = meta
    content[METRICS] = MetricRecord(
        {
            "num-examples": int(update.num_examples),
            **dict(metrics or {}),
            **{UPDATE_METRIC + k: float(v) for k, v in update.metrics.items()},
        }
    )
    return content


def decode_update(
    content: RecordDict,
    shapes: Mapping[str, tuple[int, ...]],
    known_masks: Mapping[str, Tensor] | None,
) -> ClientUpdate:
    """Inverse of [`encode_update`] on the server (packed or not): dense tensors (zeros outside the mask) with their
    mask.

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
    groups = get_arrays(content)
    masks: dict[str, Tensor] | None = None
    if MASKS in groups:
        masks = bits_to_masks(groups[MASKS], shapes)
        # PerFIT's personal_b uploads A's masks only; the strategy checks which keys it needs
        check_tensor_shapes(f"client {client_id!r}: masks", masks, shapes, complete=False)
    elif meta.get("tensors-mode") == KEPT:
        masks = None if known_masks is None else dict(known_masks)
    tensors = _decode_tensors(groups, meta, masks, f"client {client_id!r}'s upload")
    if tensors is None:
        raise ValueError(f"client {client_id!r} uploaded no tensors.")
    check_tensor_shapes(f"client {client_id!r}: tensors", tensors, shapes, complete=False)
    counts = content[METRICS]
    own = {k[len(UPDATE_METRIC) :]: float(v) for k, v in counts.items() if k.startswith(UPDATE_METRIC)}
    if "update-metrics" in content.metric_records:  # a reply of hf_perfit before the metrics shared one record
        own.update({k: float(v) for k, v in content["update-metrics"].items()})
    return ClientUpdate(
        client_id=client_id,
        num_examples=int(counts["num-examples"]),
        tensors=tensors,
        masks=masks,
        mask_changed=mask_changed,
        metrics=own,
        extra_tensors=dict(groups.get(EXTRA, {})),
    )
