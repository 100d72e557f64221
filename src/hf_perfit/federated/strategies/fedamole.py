"""`fedamole`: FedAMoLE (arXiv 2411.19128) — per-expert aggregation and reverse selection-based expert assignment
(docs/fedamole.md § Server: aggregation, § Server: RSEA, per module)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...mole.assignment import assignment_error, expert_client_scores, selection_probabilities, solve_assignment
from ...mole.keys import (
    EXPERT_KINDS,
    NUM_TOKENS_KEY,
    SHARED_KINDS,
    expert_key,
    parse_key,
    parse_stat_key,
    shared_key,
)
from ..messages import ClientInstruction, ClientUpdate
from .base import Strategy, register_strategy

TOKEN_MEAN_PREFIX = "tmean/"
EXPERT_MEAN_PREFIX = "emean/"
EXPERT_KNOWN_PREFIX = "eknown/"


@register_strategy
class FedAMoLEStrategy(Strategy):
    """FedAMoLE's server: per-expert aggregation of MoLE adapters and RSEA expert assignment.

    The global adapter `θ_g` holds, per MoLE module, the shared expert, the token projection `P` and all `E` domain
    experts (keys as in [`hf_perfit.mole.keys`]). Every round:

    1. [`configure_round`] assigns experts to the sampled clients, module by module, with RSEA: scores
       `S_jc = e_jᵀ t̄_c/√r` from the statistics the clients uploaded last time (`t̄_c`: client `c`'s mean token
       embedding `P x`; `e_j`: expert `j`'s mean embedding `A_j x` over the tokens of the clients that held it),
       preferences `p_jc = softmax_c(S_jc)`, and the 0/1 assignment maximizing `Σ p_jc X_jc` with each expert taken by
       exactly `clients_per_expert` clients and each client holding `experts_per_client_min .. experts_per_client_max`
       experts (`scipy.optimize.milp`). Where a statistic is still unknown (round 0, a client never seen before, an
       expert nobody held yet) the score is seeded noise, drawn from `(seed, round, module)` so a resumed run
       reassigns exactly; in round 0 every score is noise (a random assignment).
    2. [`configure_client`] sends each client the global shared expert, `P` and its assigned experts only.
    3. [`aggregate`]: `P` and the shared expert are averaged over all of this round's clients, each domain expert over
       the clients that held it (weights `n_k`, float64 sums); an expert nobody held keeps its value. The uploaded
       statistics update `t̄_c` (per client) and `e_j` (per expert, token-weighted over its holders).

    A client's personalized adapter ([`personalized_tensors`]) is the global shared expert and `P` plus the global
    values of the experts it held in its last round.

    Round metrics: `num_clients`, `num_examples`, `update_norm` (`‖θ_g^new − θ_g^old‖₂`), `experts_trained_fraction`
    (domain experts with at least one holder this round, over all), `mean_experts_per_client` (per module),
    `assignment_score` (mean over modules of `Σ p_jc X_jc / E`, the preference mass the assignment captured; `k/C`
    for random preferences, up to `k`), `clients_with_statistics`.

    Args:
        clients_per_expert (`int`, defaults to 2): `k`: clients that train each domain expert per round.
        experts_per_client_min (`int`, defaults to 2): fewest domain experts a client holds (per module).
        experts_per_client_max (`int`, defaults to 8): most domain experts a client holds (per module).
        seed (`int`, defaults to 0): seed of the noise scores (round 0, unknown statistics).
    """

    name = "fedamole"
    evaluate_local_model = True
    """The authors evaluate each client's locally trained model, before aggregation (docs/fedamole.md): a coordinator
    that reads this attribute reports that evaluation as `local_perplexity`, next to the personalized one."""
    default_options = {"clients_per_expert": 2, "experts_per_client_min": 2, "experts_per_client_max": 8, "seed": 0}

    def __init__(self, **options: Any) -> None:
        self._modules: dict[str, dict[str, Any]] = {}
        self._assignment: dict[str, dict[str, list[int]]] = {}
        self._assignment_round: int | None = None
        self._assignment_score: float | None = None
        self._token_means: dict[str, dict[str, Tensor]] = {}
        self._expert_means: dict[str, Tensor] = {}
        self._expert_known: dict[str, Tensor] = {}
        super().__init__(**options)

    def _check_options(self) -> None:
        for name in ("clients_per_expert", "experts_per_client_min", "experts_per_client_max"):
            value = self._options[name]
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"option {name}={value!r} must be an integer >= 1.")
            self._options[name] = int(value)
        seed = self._options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"option seed={seed!r} must be an integer >= 0.")
        self._options["seed"] = int(seed)
        if self._options["experts_per_client_min"] > self._options["experts_per_client_max"]:
            raise ValueError(
                f"option experts_per_client_min={self._options['experts_per_client_min']} > experts_per_client_max="
                f"{self._options['experts_per_client_max']}; set min <= max."
            )

    def _reset_state(self) -> None:
        self._modules = _parse_structure(self._require_global())
        self._assignment, self._assignment_round, self._assignment_score = {}, None, None
        self._token_means = {}
        self._expert_means = {m: torch.zeros(len(s["experts"]), s["rank"]) for m, s in self._modules.items()}
        self._expert_known = {m: torch.zeros(len(s["experts"]), dtype=torch.bool) for m, s in self._modules.items()}

    # ------------------------------------------------------------------ structure

    @property
    def modules(self) -> list[str]:
        """The MoLE modules of the global adapter (sorted)."""
        return list(self._modules)

    def assignment(self) -> dict[str, dict[str, list[int]]]:
        """The expert ids per module of every client of the last configured round (a copy)."""
        return {cid: {m: list(ids) for m, ids in a.items()} for cid, a in self._assignment.items()}

    def _shared_keys(self) -> list[str]:
        return [shared_key(m, kind) for m in self._modules for kind in SHARED_KINDS]

    def _expert_keys(self, experts: Mapping[str, list[int]]) -> list[str]:
        return [expert_key(m, kind, j) for m, ids in experts.items() for j in ids for kind in EXPERT_KINDS]

    # ------------------------------------------------------------------ round

    def configure_round(self, round_idx: int, client_ids: list[str]) -> None:
        """Assign experts to this round's clients with RSEA (see the class docstring).

        Raises:
            ValueError: no assignment satisfies the constraints for `len(client_ids)` clients (the message names the
                options to change), or `client_ids` is empty or repeats a client.
        """
        self._require_global()
        if not client_ids or len(set(client_ids)) != len(client_ids):
            raise ValueError(f"configure_round needs distinct client ids, got {client_ids!r}.")
        opts = self._options
        k, lo, hi = opts["clients_per_expert"], opts["experts_per_client_min"], opts["experts_per_client_max"]
        assignment: dict[str, dict[str, list[int]]] = {cid: {} for cid in client_ids}
        scores = []
        for index, (module, spec) in enumerate(self._modules.items()):
            ids = spec["experts"]
            error = assignment_error(len(ids), len(client_ids), k, lo, hi)
            if error is not None:
                raise ValueError(
                    f"fedamole cannot assign the {len(ids)} experts of {module} in round {round_idx}: {error}"
                )
            p = selection_probabilities(self._scores(module, index, round_idx, client_ids))
            x = solve_assignment(p, k, lo, hi)
            scores.append(float((p * x).sum()) / len(ids))
            for c, cid in enumerate(client_ids):
                assignment[cid][module] = [ids[j] for j in np.flatnonzero(x[:, c])]
        self._assignment, self._assignment_round = assignment, int(round_idx)
        self._assignment_score = float(np.mean(scores)) if scores else None

    def _scores(self, module: str, index: int, round_idx: int, client_ids: list[str]) -> np.ndarray:
        """`S_jc` for one module; seeded noise where `e_j` or `t̄_c` is unknown (everywhere in round 0)."""
        spec = self._modules[module]
        rng = np.random.default_rng([self._options["seed"], int(round_idx), index])
        noise = rng.standard_normal((len(spec["experts"]), len(client_ids)))  # always drawn: same stream on resume
        known_e = self._expert_known[module].numpy()
        known_c = np.array([module in self._token_means.get(cid, {}) for cid in client_ids])
        if not known_e.any() or not known_c.any():
            return noise
        t = np.stack(
            [
                self._token_means[cid][module].numpy() if ok else np.zeros(spec["rank"])
                for cid, ok in zip(client_ids, known_c, strict=True)
            ]
        )
        s = expert_client_scores(self._expert_means[module].numpy(), t, spec["rank"])
        known = known_e[:, None] & known_c[None, :]
        spread = float(s[known].std()) if known.sum() > 1 else 0.0
        # unknown entries compete on the scale of the known ones instead of dominating or vanishing
        return np.where(known, s, noise * (spread if spread > 0 else 1.0))

    def configure_client(self, client_id: str, round_idx: int) -> ClientInstruction:
        """The global shared expert and `P` of every module plus the client's assigned experts (nothing else).

        Raises:
            RuntimeError: [`configure_round`] did not assign experts to `client_id` for `round_idx`.
        """
        glob = self._require_global()
        if self._assignment_round != round_idx or client_id not in self._assignment:
            raise RuntimeError(
                f"fedamole has no expert assignment for client {client_id!r} in round {round_idx}: call "
                "configure_round(round_idx, sampled_client_ids) first."
            )
        keys = self._shared_keys() + self._expert_keys(self._assignment[client_id])
        return ClientInstruction(tensors={k: glob[k].clone() for k in keys}, config=self.client_options())

    def personalized_tensors(self, client_id: str, local_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Global shared experts and `P`, plus the global values of the domain experts in `local_tensors` (the
        experts the client held in its last round; all of them for a client that never trained)."""
        glob = self._require_global()
        keys = self._shared_keys() + [k for k in local_tensors if k in glob and parse_key(k).expert is not None]
        return {k: glob[k].clone() for k in keys}

    def _aggregate(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        glob = self._require_global()
        client_tensors = [self._check_mole_update(u, round_idx) for u in updates]
        client_stats = [self._check_statistics(u, t) for u, t in zip(updates, client_tensors, strict=True)]
        weights = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)

        new: dict[str, Tensor] = {}
        sq_change = 0.0
        trained = total_experts = 0
        for key, old in glob.items():
            holders = [i for i, t in enumerate(client_tensors) if key in t]
            if parse_key(key).kind == "expert_A":
                total_experts += 1
                trained += bool(holders)
            if not holders:
                new[key] = old  # held by nobody this round: keep its value
                continue
            w = weights[holders]
            stacked = torch.stack([client_tensors[i][key] for i in holders]).to(torch.float64)
            avg = (stacked * w.view(-1, *([1] * old.dim()))).sum(0) / w.sum()
            sq_change += float((avg - old.to(torch.float64)).square().sum())
            new[key] = avg.to(torch.float32)
        self._global = new
        self._update_statistics(updates, client_stats)

        held = [
            sum(1 for k in t if parse_key(k).kind == "expert_A") / max(len(self._modules), 1) for t in client_tensors
        ]
        metrics = {
            "num_clients": float(len(updates)),
            "num_examples": float(weights.sum()),
            "update_norm": sq_change**0.5,
            "experts_trained_fraction": trained / max(total_experts, 1),
            "mean_experts_per_client": float(np.mean(held)),
            "clients_with_statistics": float(sum(bool(s) for s in client_stats)),
        }
        if self._assignment_score is not None and self._assignment_round == round_idx:
            metrics["assignment_score"] = self._assignment_score
        return metrics

    def _check_mole_update(self, update: ClientUpdate, round_idx: int) -> dict[str, Tensor]:
        """Float32 CPU copies of a client's upload: every shared tensor, plus whole experts (both halves) that must
        be the ones it was assigned this round (when the server assigned it any)."""
        glob = self._require_global()
        cid = update.client_id
        unknown = sorted(k for k in update.tensors if k not in glob)
        if unknown:
            raise ValueError(f"client {cid!r}: tensors do not fit the global MoLE adapter: unexpected {unknown[:3]}.")
        missing = [k for k in self._shared_keys() if k not in update.tensors]
        if missing:
            raise ValueError(f"client {cid!r}: upload lacks the shared tensors {missing[:3]} (P and shared expert).")
        experts: dict[str, set[int]] = {}
        for k in update.tensors:
            parsed = parse_key(k)
            if parsed.expert is not None:
                experts.setdefault(parsed.module, set()).add(parsed.expert)
        for module, ids in experts.items():
            for j in ids:
                if any(expert_key(module, kind, j) not in update.tensors for kind in EXPERT_KINDS):
                    raise ValueError(
                        f"client {cid!r}: expert {j} of {module} must come with both expert_A and expert_B."
                    )
        if self._assignment_round == round_idx and cid in self._assignment:
            expected = {m: set(ids) for m, ids in self._assignment[cid].items() if ids}
            got = {m: ids for m, ids in experts.items() if ids}
            if got != expected:
                bad = sorted(m for m in set(got) | set(expected) if got.get(m) != expected.get(m))
                raise ValueError(
                    f"client {cid!r} uploaded experts that differ from its assignment in round {round_idx} (first "
                    f"module {bad[0]}: got {sorted(got.get(bad[0], ()))}, assigned {sorted(expected.get(bad[0], ()))})."
                )
        out = {}
        for k, t in update.tensors.items():
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(glob[k].shape):
                raise ValueError(f"client {cid!r}: tensor {k!r} has the wrong shape, expected {tuple(glob[k].shape)}.")
            out[k] = t.detach().to(device="cpu", dtype=torch.float32)
        return out

    def _check_statistics(self, update: ClientUpdate, tensors: dict[str, Tensor]) -> dict[str, Any]:
        """The client's RSEA statistics from `update.extra_tensors` (empty dict if it sent none)."""
        extras = update.extra_tensors or {}
        if not extras:
            return {}
        cid = update.client_id
        token: dict[str, Tensor] = {}
        expert: dict[tuple[str, int], Tensor] = {}
        num_tokens = None
        for k, v in extras.items():
            if k == NUM_TOKENS_KEY:
                num_tokens = float(v.reshape(-1)[0])
                continue
            parsed = parse_stat_key(k)
            if parsed is None or parsed[0] not in self._modules:
                raise ValueError(f"client {cid!r}: extra tensor {k!r} is not a FedAMoLE statistic of this adapter.")
            module, j = parsed
            r = self._modules[module]["rank"]
            if not isinstance(v, Tensor) or tuple(v.shape) != (r,):
                raise ValueError(f"client {cid!r}: statistic {k!r} must have shape ({r},).")
            if j is None:
                token[module] = v.detach().float().cpu()
            else:
                if expert_key(module, "expert_A", j) not in tensors:
                    raise ValueError(
                        f"client {cid!r} sent an embedding of expert {j} of {module}, which it did not hold."
                    )
                expert[(module, j)] = v.detach().float().cpu()
        weight = num_tokens if num_tokens is not None and num_tokens > 0 else float(update.num_examples)
        return {"token": token, "expert": expert, "weight": weight}

    def _update_statistics(self, updates: list[ClientUpdate], stats: list[dict[str, Any]]) -> None:
        sums: dict[tuple[str, int], tuple[Tensor, float]] = {}
        for u, s in zip(updates, stats, strict=True):
            if not s:
                continue
            if s["token"]:
                self._token_means.setdefault(u.client_id, {}).update(s["token"])
            for key, v in s["expert"].items():
                total, w = sums.get(key, (torch.zeros_like(v, dtype=torch.float64), 0.0))
                sums[key] = (total + s["weight"] * v.double(), w + s["weight"])
        for (module, j), (total, w) in sums.items():
            row = self._modules[module]["experts"].index(j)
            self._expert_means[module][row] = (total / w).float()
            self._expert_known[module][row] = True

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """As [`Strategy.state_dict`], plus the last assignment (`meta`), each client's `t̄_c` as
        `tmean/<client_id>/<module>` and each module's expert embeddings as `emean/<module>` with their known-flags
        `eknown/<module>`."""
        tensors, meta = super().state_dict()
        meta["assignment"] = self.assignment()
        meta["assignment_round"] = self._assignment_round
        meta["assignment_score"] = self._assignment_score
        meta["statistics_clients"] = list(self._token_means)
        for cid, per_module in self._token_means.items():
            tensors.update({f"{TOKEN_MEAN_PREFIX}{cid}/{m}": t.clone().contiguous() for m, t in per_module.items()})
        for m in self._expert_means:
            tensors[EXPERT_MEAN_PREFIX + m] = self._expert_means[m].clone().contiguous()
            tensors[EXPERT_KNOWN_PREFIX + m] = self._expert_known[m].clone().contiguous()
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the state saved by [`state_dict`]."""
        super().load_state_dict(tensors, meta)
        if self._global is None:
            return
        self._assignment = {
            str(cid): {str(m): [int(j) for j in ids] for m, ids in a.items()}
            for cid, a in (meta.get("assignment") or {}).items()
        }
        last = meta.get("assignment_round")
        self._assignment_round = None if last is None else int(last)
        score = meta.get("assignment_score")
        self._assignment_score = None if score is None else float(score)
        self._token_means = {}
        for cid in meta.get("statistics_clients", []):
            found = {
                m: tensors[f"{TOKEN_MEAN_PREFIX}{cid}/{m}"].float()
                for m in self._modules
                if f"{TOKEN_MEAN_PREFIX}{cid}/{m}" in tensors
            }
            self._token_means[str(cid)] = found
        for m in self._modules:
            for prefix, store in ((EXPERT_MEAN_PREFIX, self._expert_means), (EXPERT_KNOWN_PREFIX, self._expert_known)):
                if prefix + m not in tensors:
                    raise ValueError(f"strategy state is missing tensor {prefix + m!r}.")
                value = tensors[prefix + m]
                if tuple(value.shape) != tuple(store[m].shape):
                    raise ValueError(
                        f"strategy tensor {prefix + m!r} has shape {tuple(value.shape)}, expected {tuple(store[m].shape)}."
                    )
                store[m] = value.to(store[m].dtype).clone()


def _parse_structure(glob: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """`{module: {"experts": [ids], "rank": r}}` of a global MoLE adapter, checked to be complete."""
    modules: dict[str, dict[str, Any]] = {}
    kinds: dict[str, set[str]] = {}
    for key, t in glob.items():
        parsed = parse_key(key)
        if parsed is None:
            raise ValueError(
                f"fedamole needs a MoLE adapter, but the global adapter has {key!r}; build the client model for "
                "strategy 'fedamole' (hf_perfit.mole.MoLEModel)."
            )
        spec = modules.setdefault(parsed.module, {"experts": set(), "rank": None})
        if parsed.expert is None:
            kinds.setdefault(parsed.module, set()).add(parsed.kind)
            if parsed.kind == "P":
                spec["rank"] = int(t.shape[0])
        else:
            spec["experts"].add(parsed.expert)
    for module, spec in modules.items():
        if kinds.get(module, set()) != set(SHARED_KINDS):
            raise ValueError(
                f"the global MoLE adapter lacks shared tensors of {module}: has {sorted(kinds.get(module, ()))}."
            )
        spec["experts"] = sorted(spec["experts"])
        for j in spec["experts"]:
            if any(expert_key(module, kind, j) not in glob for kind in EXPERT_KINDS):
                raise ValueError(f"the global MoLE adapter has only half of expert {j} of {module}.")
    return dict(sorted(modules.items()))
