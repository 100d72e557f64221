"""The server-side strategy interface and the strategy registry.

A strategy is pure tensor code: it holds the server state (the global adapter `θ_g` and whatever else the method
needs), tells each sampled client what to start from ([`Strategy.configure_client`]) and folds the clients' uploads
back into the server state ([`Strategy.aggregate`]). It never sees a model or trains anything, so the in-process
simulation and the Flower `ServerApp` drive the very same objects.

One round, as a coordinator runs it:

```python
strategy.configure_round(round_idx, sampled_ids)  # optional hook (FedMut pairs its mutations here)
instructions = {cid: strategy.configure_client(cid, round_idx) for cid in sampled_ids}
updates = [client_update(cid, instructions[cid]) for cid in sampled_ids]  # local training
metrics = strategy.aggregate(round_idx, updates)
```
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from ..messages import ClientInstruction, ClientUpdate

__all__ = ["STATE_FORMAT_VERSION", "STRATEGIES", "Strategy", "get_strategy", "register_strategy"]

STATE_FORMAT_VERSION = 1
GLOBAL_PREFIX = "global/"


class Strategy(ABC):
    """Base class of the server-side federated strategies.

    Subclasses set [`name`] and [`default_options`], implement [`configure_client`] and [`_aggregate`], and register
    themselves with [`register_strategy`]. Extra server state goes into [`state_dict`] / [`load_state_dict`] by
    overriding both and calling `super()`.

    Args:
        **options: the strategy's options; every key must be one of [`default_options`] (missing ones take the
            default). Subclasses validate the values in [`_check_options`].

    Raises:
        ValueError: on an unknown option (the message names it and lists the allowed ones) or an invalid value.
    """

    name: ClassVar[str] = ""
    """Registry name (`"fedit"`, `"perfit"`, ...)."""

    default_options: ClassVar[dict[str, Any]] = {}
    """The allowed options and their defaults (JSON-able values)."""

    uses_masks: ClassVar[bool] = False
    """Whether clients train PerFIT's expanded, masked adapter and upload their keep-masks (PerFIT only)."""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            allowed = sorted(self.default_options) or "none"
            raise ValueError(f"unknown option(s) {unknown} for strategy {self.name!r}; allowed options: {allowed}.")
        self._options: dict[str, Any] = {**self.default_options, **options}
        self._check_options()
        self._global: dict[str, Tensor] | None = None
        self.last_round: int | None = None

    # ------------------------------------------------------------------ options

    def _check_options(self) -> None:
        """Validate (and normalise) `self._options`; raise `ValueError` on a bad value. Default: nothing to check."""
        return None

    @property
    def options(self) -> dict[str, Any]:
        """The effective options (defaults filled in), a copy."""
        return dict(self._options)

    def client_options(self) -> dict[str, Any]:
        """Static settings the client update needs for every round of this strategy (e.g. FedProx's `proximal_mu`).

        Returns:
            `dict[str, Any]`: JSON-able; empty by default.
        """
        return {}

    # ------------------------------------------------------------------ state

    def initialize(self, global_tensors: Mapping[str, Tensor]) -> None:
        """Set the initial global adapter `θ_g` (copied to float32 on CPU) and reset all other server state.

        Args:
            global_tensors (`Mapping[str, Tensor]`): the initial adapter state, keyed like
                `peft.get_peft_model_state_dict`.
        """
        if not global_tensors:
            raise ValueError("initialize() needs a non-empty adapter state.")
        for key, t in global_tensors.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"global tensor {key!r} must be a floating-point torch.Tensor, got {_describe(t)}.")
        self._global = {k: _to_state(t) for k, t in global_tensors.items()}
        self.last_round = None
        self._reset_state()

    def _reset_state(self) -> None:
        """Hook for subclasses: forget the server state other than `θ_g` (called by [`initialize`])."""
        return None

    @property
    def is_initialized(self) -> bool:
        """Whether [`initialize`] (or [`load_state_dict`]) has run."""
        return self._global is not None

    @property
    def global_tensors(self) -> dict[str, Tensor]:
        """A copy of the current global adapter `θ_g` (float32, CPU)."""
        return {k: t.clone() for k, t in self._require_global().items()}

    def _require_global(self) -> dict[str, Tensor]:
        if self._global is None:
            raise RuntimeError(f"strategy {self.name!r} is not initialized: call initialize(global_tensors) first.")
        return self._global

    # ------------------------------------------------------------------ round

    def configure_round(self, round_idx: int, client_ids: list[str]) -> None:
        """Optional hook, called once per round before the [`configure_client`] calls, with the sampled clients.

        Strategies whose instructions depend on the whole sample (FedMut's mutation pairs, FedAMoLE's expert
        assignment) prepare them here. Default: nothing.

        Args:
            round_idx (`int`): the round (0-based).
            client_ids (`list[str]`): the clients sampled for this round, in a deterministic order.
        """
        return None

    def personalized_tensors(self, client_id: str, local_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The adapter client `client_id` ends a round with (what is evaluated and exported): by default the global
        adapter; strategies with personal state override it. `local_tensors` is the client's own last adapter."""
        return self.global_tensors

    def personal_parts(self) -> list[str]:
        """The adapter matrices (e.g. `["lora_B"]`) every client keeps to itself: never sent, never aggregated
        (`ClientInstruction.config["personal"]`). Their personalized values exist only in the clients' own states:
        [`personalized_tensors`] takes them from `local_tensors` where the transport holds them (in-process), and the
        client adds its own where it does not (Flower's `ClientApp`). Default: none."""
        return []

    def finetune_instruction(self, client_id: str, personalized: dict[str, Tensor]) -> ClientInstruction:
        """What client `client_id` fine-tunes from after the last round (`finetune_steps`): by default its
        personalized adapter `personalized` ([`personalized_tensors`]), dense. Strategies whose clients already hold
        part of it (a PerFIT mask, personal matrices) send less."""
        return ClientInstruction(tensors=personalized)

    @abstractmethod
    def configure_client(self, client_id: str, round_idx: int) -> ClientInstruction:
        """What client `client_id` starts round `round_idx` from.

        Args:
            client_id (`str`): the client.
            round_idx (`int`): the round (0-based).

        Returns:
            [`ClientInstruction`]: its tensors are fresh copies, safe to modify.
        """

    def aggregate(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """Fold this round's client uploads into the server state.

        Args:
            round_idx (`int`): the round (0-based).
            updates (`list[ClientUpdate]`): one upload per participating client.

        Returns:
            `dict[str, float]`: round-level metrics (strategy specific).

        Raises:
            ValueError: on an empty `updates`, a client with `num_examples <= 0`, a client listed twice, or tensors
                that do not fit the global adapter.
        """
        if not updates:
            raise ValueError(f"aggregate() got no client updates for round {round_idx}.")
        seen: set[str] = set()
        for u in updates:
            if isinstance(u.num_examples, bool) or not isinstance(u.num_examples, numbers.Integral):
                raise ValueError(f"client {u.client_id!r}: num_examples must be an int, got {u.num_examples!r}.")
            if u.num_examples <= 0:
                raise ValueError(f"client {u.client_id!r} reported num_examples={u.num_examples}; it must be > 0.")
            if u.client_id in seen:
                raise ValueError(f"client {u.client_id!r} appears more than once in round {round_idx}.")
            seen.add(u.client_id)
        metrics = self._aggregate(round_idx, updates)
        self.last_round = int(round_idx)
        return metrics

    @abstractmethod
    def _aggregate(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """The strategy's aggregation, on updates already checked by [`aggregate`]."""

    def _check_update_tensors(
        self, update: ClientUpdate, reference: dict[str, Tensor] | None = None, what: str = "tensor"
    ) -> dict[str, Tensor]:
        """Check that `update.tensors` has exactly the keys and shapes of `reference` (default `θ_g`; PerFIT's
        `personal_b` passes the shared part); return them as float32 CPU tensors."""
        glob = self._require_global() if reference is None else reference
        check_like_global(update.client_id, what, update.tensors, glob)
        return {key: update.tensors[key].detach().to(device="cpu", dtype=torch.float32) for key in glob}

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The server state, for checkpoint/resume.

        Returns:
            `tuple[dict[str, Tensor], dict[str, Any]]`: tensors for `safetensors.torch.save_file` (keys `global/<key>`,
            plus subclass prefixes such as `mask/<client_id>/<key>`; contiguous CPU tensors) and JSON-able metadata
            (strategy name, options, adapter keys, ...). [`load_state_dict`] restores them exactly.
        """
        meta: dict[str, Any] = {
            "strategy": self.name,
            "format_version": STATE_FORMAT_VERSION,
            "options": self.options,
            "last_round": self.last_round,
            "keys": None,
        }
        tensors: dict[str, Tensor] = {}
        if self._global is not None:
            meta["keys"] = list(self._global)
            tensors.update({GLOBAL_PREFIX + k: t.clone().contiguous() for k, t in self._global.items()})
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the state saved by [`state_dict`].

        Args:
            tensors (`Mapping[str, Tensor]`): the saved tensors.
            meta (`Mapping[str, Any]`): the saved metadata.

        Raises:
            ValueError: if the state belongs to another strategy, another format version, was saved with other
                options (an option the saved state lacks counts as its default; build the strategy with
                `get_strategy(meta["strategy"], **meta["options"])`), or misses tensors.
        """
        if meta.get("strategy") != self.name:
            raise ValueError(f"this state was saved by strategy {meta.get('strategy')!r}, not {self.name!r}.")
        if meta.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(
                f"unsupported strategy state format_version={meta.get('format_version')!r} "
                f"(expected {STATE_FORMAT_VERSION})."
            )
        # An option added to the strategy after the state was saved ran with its default (e.g. PerFIT's aggregation).
        if {**self.default_options, **dict(meta.get("options", {}))} != self._options:
            raise ValueError(
                f"this state was saved with options {meta.get('options')}, but this {self.name!r} strategy has "
                f"{self._options}; build it with the saved options to resume."
            )
        keys = meta.get("keys")
        if keys is None:
            self._global = None
        else:
            self._global = {k: _to_state(_take(tensors, GLOBAL_PREFIX + k)) for k in keys}
        self._reset_state()
        last = meta.get("last_round")
        self.last_round = None if last is None else int(last)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}({opts})"


def _to_state(t: Tensor) -> Tensor:
    """A float32, contiguous CPU copy (never aliasing the caller's tensor)."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def _take(tensors: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise ValueError(f"strategy state is missing tensor {key!r}.")
    return tensors[key]


def check_like_global(client_id: str, what: str, tensors: Mapping[str, Any], glob: Mapping[str, Tensor]) -> None:
    """Raise `ValueError` unless `tensors` (a client's `what`s: tensors or masks) has exactly the keys and shapes of
    the global adapter `glob`, naming the client and the first offending keys."""
    if set(tensors) != set(glob):
        missing, extra = sorted(set(glob) - set(tensors)), sorted(set(tensors) - set(glob))
        raise ValueError(
            f"client {client_id!r}: {what}s do not fit the global adapter: missing {_first(missing)}, "
            f"unexpected {_first(extra)}."
        )
    for key, ref in glob.items():
        t = tensors[key]
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"client {client_id!r}: {what} {key!r} is {_describe(t)}, expected shape {tuple(ref.shape)}."
            )


def _first(names: list[str], n: int = 3) -> str:
    return f"{names[:n]}{'...' if len(names) > n else ''}"


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def check_nonnegative_float(name: str, value: Any) -> float:
    """`float(value)` if it is a finite real number >= 0, else `ValueError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"option {name}={value!r} must be a finite number >= 0.")
    return float(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """`int(value)` if it is an integer >= 0, else `ValueError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"option {name}={value!r} must be an integer >= 0.")
    return int(value)


# ---------------------------------------------------------------------- registry

STRATEGIES: dict[str, type[Strategy]] = {}
"""Registered strategies by name; fill it with [`register_strategy`]."""

_S = TypeVar("_S", bound=type[Strategy])


def register_strategy(cls: _S) -> _S:
    """Class decorator: add a [`Strategy`] subclass to [`STRATEGIES`] under its `name`.

    Raises:
        TypeError: if `cls` is not a concrete `Strategy` subclass.
        ValueError: if `name` is empty or already taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or getattr(cls, "__abstractmethods__", None):
        raise TypeError(f"register_strategy expects a concrete Strategy subclass, got {cls!r}.")
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`.")
    existing = STRATEGIES.get(name)
    if existing is not None and _qualified(existing) != _qualified(cls):
        raise ValueError(f"strategy name {name!r} is already registered by {_qualified(existing)}.")
    STRATEGIES[name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_strategy(name: str, **options: Any) -> Strategy:
    """Build a registered strategy by name.

    Args:
        name (`str`): one of [`STRATEGIES`] (`"local"`, `"fedit"`, `"fedprox"`, `"perfit"`, ...).
        **options: the strategy's options.

    Raises:
        ValueError: on an unknown name (the message lists the allowed ones) or bad options.
    """
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; allowed: {sorted(STRATEGIES)}.")
    return cls(**options)
