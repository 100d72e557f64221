"""Names of a MoLE adapter's tensors, shared by the model (client side) and the FedAMoLE strategy (server side).

Adapter tensors are keyed like `peft.get_peft_model_state_dict` (and like the keys in `adapter_model.safetensors`):

    base_model.model.<module>.mole_shared_A          (r, d_in)    shared expert A₀
    base_model.model.<module>.mole_shared_B          (d_out, r)   shared expert B₀
    base_model.model.<module>.mole_P                 (r, d_in)    token projection P
    base_model.model.<module>.mole_expert_A.<j>      (r, d_in)    domain expert j, A_j
    base_model.model.<module>.mole_expert_B.<j>      (d_out, r)   domain expert j, B_j

`<module>` is the wrapped module's name in the base model (`model.layers.0.self_attn.q_proj`). The per-round
statistics a client uploads for the server's expert assignment (`ClientUpdate.extra_tensors`) are keyed

    base_model.model.<module>.mole_token_mean        (r,)   t̄_c: mean of P x over the client's non-padding tokens
    base_model.model.<module>.mole_expert_mean.<j>   (r,)   e_j(c): mean of A_j x over the same tokens
    mole_num_tokens                                  (1,)   the number of tokens the means are over
"""

from __future__ import annotations

import re
from typing import NamedTuple

PEFT_PREFIX = "base_model.model."
SHARED_KINDS = ("shared_A", "shared_B", "P")
EXPERT_KINDS = ("expert_A", "expert_B")
NUM_TOKENS_KEY = "mole_num_tokens"

_TENSOR_RE = re.compile(
    r"^(?P<module>.+)\.mole_(?:(?P<shared>shared_A|shared_B|P)|(?P<expert>expert_[AB])\.(?P<j>\d+))$"
)
_STAT_RE = re.compile(r"^(?P<module>.+)\.mole_(?:(?P<token>token_mean)|expert_mean\.(?P<j>\d+))$")


class MoLEKey(NamedTuple):
    """A parsed adapter tensor key: the module (without `base_model.model.`), the kind (`"shared_A"`,
    `"shared_B"`, `"P"`, `"expert_A"`, `"expert_B"`) and the expert id (`None` for the shared kinds)."""

    module: str
    kind: str
    expert: int | None


def _strip(module: str) -> str:
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def shared_key(module: str, kind: str) -> str:
    """Key of module `module`'s shared tensor `kind` (`"shared_A"`, `"shared_B"` or `"P"`)."""
    if kind not in SHARED_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {SHARED_KINDS}.")
    return f"{PEFT_PREFIX}{module}.mole_{kind}"


def expert_key(module: str, kind: str, expert: int) -> str:
    """Key of domain expert `expert`'s tensor `kind` (`"expert_A"` or `"expert_B"`) in module `module`."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {EXPERT_KINDS}.")
    return f"{PEFT_PREFIX}{module}.mole_{kind}.{int(expert)}"


def parse_key(key: str) -> MoLEKey | None:
    """Parse an adapter tensor key (see the module docstring); `None` if it is not one."""
    m = _TENSOR_RE.match(key)
    if m is None:
        return None
    if m["shared"] is not None:
        return MoLEKey(_strip(m["module"]), m["shared"], None)
    return MoLEKey(_strip(m["module"]), m["expert"], int(m["j"]))


def token_mean_key(module: str) -> str:
    """Key of the client statistic `t̄_c` of module `module`."""
    return f"{PEFT_PREFIX}{module}.mole_token_mean"


def expert_mean_key(module: str, expert: int) -> str:
    """Key of the client statistic `e_j(c)` of expert `expert` in module `module`."""
    return f"{PEFT_PREFIX}{module}.mole_expert_mean.{int(expert)}"


def parse_stat_key(key: str) -> tuple[str, int | None] | None:
    """Parse a statistic key: `(module, None)` for `t̄_c`, `(module, j)` for `e_j(c)`, `None` otherwise."""
    m = _STAT_RE.match(key)
    if m is None:
        return None
    return _strip(m["module"]), (None if m["token"] else int(m["j"]))


__all__ = [
    "EXPERT_KINDS",
    "NUM_TOKENS_KEY",
    "PEFT_PREFIX",
    "SHARED_KINDS",
    "MoLEKey",
    "expert_key",
    "expert_mean_key",
    "parse_key",
    "parse_stat_key",
    "shared_key",
    "token_mean_key",
]
