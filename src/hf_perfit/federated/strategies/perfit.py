"""`perfit`: personalized parameter-wise aggregation over the clients' element masks (docs/perfit.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..messages import OWN_B, PERSONAL, SELECT_B, SELECTED_PARTS, ClientInstruction, ClientUpdate, personal_keys
from .base import Strategy, check_like_global, check_nonnegative_int, register_strategy

MASK_PREFIX = "mask/"
SEEDED_INIT = "seeded_init"
"""`ClientInstruction.config` flag: the tensors are the run's seeded initial adapter, which the client rebuilds
locally (`client_update` uses its `initial_tensors`), so they are not sent (`downlink_bytes` counts 0)."""
AGGREGATIONS = ("masked", "fedavg")
"""PerFIT's aggregation rules: per element over the clients that kept it (the paper's), or plain FedAvg."""
PERSONAL_B = ["lora_B"]
"""What `personal_b=True` keeps on the clients: every LoRA B matrix (FedSA-LoRA's split, docs/perfit.md)."""
_GRAM_CHUNK = 1 << 22  # columns per float32 matmul chunk: counts stay < 2**24, hence exact


def _masked(tensors: dict[str, Tensor], mask: dict[str, Tensor]) -> dict[str, Tensor]:
    """`θ ⊙ m`: every tensor with exactly 0.0 where the client's mask drops the element (a client's start)."""
    return {k: torch.where(mask[k], t, 0.0) for k, t in tensors.items()}


@register_strategy
class PerFITStrategy(Strategy):
    """PerFIT's personalized parameter-wise aggregation.

    Each client `k` trains only the elements of its keep-mask `m_k` (found by its architecture search) and uploads
    `θ_k ⊙ m_k`, `n_k` and, when it changed, `m_k`. The server caches every client's last mask. For each element `p`
    with `S_p = {k in this round : m_k[p] = 1}`:

        θ_g[p] = Σ_{k∈S_p} n_k θ_k[p] / Σ_{k∈S_p} n_k        (S_p empty: θ_g[p] keeps its last value)

    computed for all elements at once (masks stacked per tensor), summed in float64 and stored as float32. Values of
    `θ_k` outside `m_k` are ignored.

    A client whose mask is cached starts its round from its personalized model `θ_g ⊙ m_k` (exactly 0.0 outside the
    mask) with `mask=m_k`; a client the server has no mask of yet gets `θ_g` dense and `mask=None` (it runs its search
    first), except before the first aggregation, when `θ_g` is still the seeded initial adapter: then the instruction
    carries `config={"seeded_init": True}` and the client rebuilds `θ_g` from the run's seed (nothing is sent). On a re-search round every sampled client gets `θ_g` dense, `mask=None` and
    `config={"research": True}`: starting from its own masked model the search could never regrow a pruned element
    (its Taylor score `|0·g|` is 0), while `θ_g` carries the other clients' values there.

    Round metrics: `shared_fraction` (elements kept by >= 2 of this round's clients / all elements),
    `exclusive_fraction` (kept by exactly 1), `mask_jaccard` (mean pairwise Jaccard index of this round's masks, 1.0
    with fewer than 2 clients; two empty masks count as identical), `mean_density` (mean kept fraction per client),
    `num_new_masks`, `num_clients`, `num_examples`, `update_norm` (`‖θ_g^new − θ_g^old‖₂`).

    Args:
        research_every (`int`, *optional*, defaults to 0): when > 0, rounds `round_idx > 0` with
            `round_idx % research_every == 0` ask the sampled clients to run the architecture search again. 0: the
            mask found in a client's first round stays fixed.
        aggregation (`str`, *optional*, defaults to `"masked"`): `"masked"` is the per-element aggregation above
            (the paper's). `"fedavg"` is the ablation that plain-averages the masked adapters over all of the round's
            clients, `θ_g[p] = Σ_k n_k m_k[p] θ_k[p] / Σ_k n_k`: an element kept by few clients is pulled towards 0
            by the others' zeros, and one kept by none becomes 0 (docs/perfit.md, "Aggregation").
        personal_b (`bool`, *optional*, defaults to `False`): the variant `perfit_pb` ("PerFIT with personal B",
            after FedSA-LoRA's split): only the LoRA A matrices are aggregated (by `aggregation`, over the clients
            that kept each element) and sent; every client keeps its own LoRA B (still masked by its own mask, its
            budget unchanged), which never leaves it: the instruction carries the A tensors only with
            `config={"personal": ["lora_B"]}`, the upload leaves B's values and mask out, and the server's B stays
            the seeded init (what a client without state starts from). The server caches the A part of each mask
            only, and the round metrics above are over the A elements. Needs the client states next to the
            coordinator (the in-process engine) and `research_every=0` (a client's own B is 0 outside its old mask,
            so a re-search could never regrow it).
        select_b_rows (`int`, *optional*, defaults to 0): when > 0, the variant `perfit_bsel` ("PerFIT with selected
            B"): everything is aggregated as in the paper's PerFIT, but each client holds that many of its training
            rows out (never trained on; the same rows every round) and, in every round after its first, starts from
            whichever LoRA B has the lower loss on them: the server's `B_g ⊙ m_k` or its own from its last round
            (`config={"select_b": n}`; the client reports the choice as its upload's metric `own_b`). The server
            caches each client's last choice, and a client's personalized adapter (evaluated, exported) takes its
            own B when it last chose its own (the client's state in-process; on Flower the server's copy of its last
            upload, which carries the B it trained). Needs `research_every=0` and `personal_b=false`. Round metric
            `own_b_fraction`: the share of the round's clients that trained from their own B.
    """

    name = "perfit"
    default_options = {"research_every": 0, "aggregation": "masked", "personal_b": False, "select_b_rows": 0}
    uses_masks = True

    def _check_options(self) -> None:
        self._options["research_every"] = check_nonnegative_int("research_every", self._options["research_every"])
        if self._options["aggregation"] not in AGGREGATIONS:
            raise ValueError(
                f"aggregation={self._options['aggregation']!r} is not supported by perfit; allowed values: "
                f"{list(AGGREGATIONS)} ('masked' is the paper's per-element aggregation, 'fedavg' the ablation)."
            )
        if not isinstance(self._options["personal_b"], bool):
            raise ValueError(
                f"personal_b={self._options['personal_b']!r} must be true or false (true: every client keeps its own "
                "LoRA B and only the A matrices are aggregated, the perfit_pb variant; false: the paper's PerFIT)."
            )
        if self._options["personal_b"] and self.research_every > 0:
            raise ValueError(
                f"personal_b=true with research_every={self.research_every} is not supported: a client's own B is "
                "exactly 0 outside its old mask, so a new search could never regrow it (its Taylor score is 0); set "
                "research_every: 0 or personal_b: false."
            )
        rows = self._options["select_b_rows"] = check_nonnegative_int("select_b_rows", self._options["select_b_rows"])
        if rows and self._options["personal_b"]:
            raise ValueError(
                "select_b_rows > 0 with personal_b=true is not supported: with personal_b the server never has a B to "
                "offer; set one of them (personal_b: false, or select_b_rows: 0)."
            )
        if rows and self.research_every > 0:
            raise ValueError(
                f"select_b_rows > 0 with research_every={self.research_every} is not supported: a client's own B is "
                "exactly 0 outside its old mask, so it could not follow a new mask; set research_every: 0."
            )

    def __init__(self, **options: Any) -> None:
        self._masks: dict[str, dict[str, Tensor]] = {}
        self._own_b: dict[str, bool] = {}
        super().__init__(**options)

    def _reset_state(self) -> None:
        self._masks = {}
        self._own_b = {}
        if self._global is not None and self._options["personal_b"] and not self._personal_keys():
            raise ValueError(
                "personal_b=true needs LoRA B tensors (keys with a '.lora_B.' component, as PEFT names them), but "
                f"the adapter has none (first keys: {list(self._global)[:3]}); set personal_b: false."
            )

    # ------------------------------------------------------------------ personal B

    def personal_parts(self) -> list[str]:
        """`["lora_B"]` with `personal_b`, else none (see [`Strategy.personal_parts`])."""
        return list(PERSONAL_B) if self._options["personal_b"] else []

    def _personal_keys(self) -> set[str]:
        """The keys of `θ_g` that stay on the clients (the B matrices with `personal_b`, else none)."""
        parts = self.personal_parts()
        return set(personal_keys(self._require_global(), parts)) if parts else set()

    def _shared_global(self) -> dict[str, Tensor]:
        """The part of `θ_g` the server aggregates and sends (all of it unless `personal_b`), not copied."""
        glob = self._require_global()
        personal = self._personal_keys()
        return {k: t for k, t in glob.items() if k not in personal}

    def _config(self, config: dict[str, Any]) -> dict[str, Any]:
        if self._options["select_b_rows"]:
            config = {**config, SELECT_B: self._options["select_b_rows"]}
        return {**config, PERSONAL: self.personal_parts()} if self._options["personal_b"] else config

    @property
    def select_b_rows(self) -> int:
        """See the class docstring (0: off)."""
        return self._options["select_b_rows"]

    def uses_own_b(self, client_id: str) -> bool:
        """Whether `client_id` trained from its own B in its last round (`select_b_rows` only; else `False`)."""
        return self._own_b.get(client_id, False)

    # ------------------------------------------------------------------ masks

    @property
    def research_every(self) -> int:
        """See the class docstring."""
        return self._options["research_every"]

    def is_research_round(self, round_idx: int) -> bool:
        """Whether round `round_idx` asks clients to search their masks again."""
        return self.research_every > 0 and round_idx > 0 and round_idx % self.research_every == 0

    @property
    def known_clients(self) -> list[str]:
        """The clients whose mask the server has cached, in first-seen order."""
        return list(self._masks)

    def client_mask(self, client_id: str) -> dict[str, Tensor] | None:
        """A copy of the cached mask of `client_id`, or `None` if the server has none."""
        mask = self._masks.get(client_id)
        return None if mask is None else {k: m.clone() for k, m in mask.items()}

    # ------------------------------------------------------------------ round

    def personalized_tensors(self, client_id: str, local_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """`θ_g ⊙ m_k` for a client whose mask is known, else `θ_g`; with `personal_b`, the B tensors are the
        client's own (`local_tensors`: already 0 outside its mask), left out where `local_tensors` lacks them (a
        transport that keeps the client states on the clients: the client adds its own)."""
        glob = self._require_global()
        mask = self._masks.get(client_id)
        personal = self._personal_keys()
        if self.uses_own_b(client_id):  # perfit_bsel: the B it chose, and trained, in its last round
            personal = set(personal_keys(glob, SELECTED_PARTS))
            missing = [k for k in personal if k not in local_tensors]
            if missing:
                raise ValueError(
                    f"client {client_id!r} trains from its own B (select_b_rows), but its last adapter lacks "
                    f"{missing[:2]}: pass the client's own tensors (its state, or its last full upload)."
                )
        out = {}
        for k, t in glob.items():
            if k in personal:
                # the client's own B; a server copy without it (Flower keeps the uploads, which leave B out) sends
                # the shared tensors only, and the client fills in its own B (hf_perfit.flower.client_app)
                if k in local_tensors:
                    out[k] = local_tensors[k].detach().to(device="cpu", dtype=torch.float32, copy=True)
            elif mask is None:
                out[k] = t.clone()
            else:
                out[k] = torch.where(mask[k], t, 0.0)
        return out

    def finetune_instruction(self, client_id: str, personalized: dict[str, Tensor]) -> ClientInstruction:
        """The client's personalized adapter restricted to the shared keys, with its mask when the server has it (the
        client holds the mask, so only the kept values count), and `config["personal"]` with `personal_b` (the client
        keeps its own B). With `select_b_rows`, the server's `θ_g ⊙ m_k` and `config["select_b"]`, as in a round: the
        client chooses between the server's B and its own before it fine-tunes."""
        shared = self._shared_global()
        mask = self._masks.get(client_id)
        if self.select_b_rows and mask is not None:
            # perfit_bsel_ft: the fine-tuning round starts as every round does, from the server's θ_g ⊙ m_k, and the
            # client chooses its B on its held-out rows once more (docs/perfit.md, `perfit_bsel_ft`)
            personalized = _masked(shared, mask)
        return ClientInstruction(
            tensors={k: personalized[k].clone() for k in shared},
            mask=None if mask is None else {k: m.clone() for k, m in mask.items()},
            config=self._config({}),
        )

    def configure_client(self, client_id: str, round_idx: int) -> ClientInstruction:
        """The personalized start `θ_g ⊙ m_k` with `mask=m_k`, or `θ_g` dense for a client without a cached mask and on
        re-search rounds (then with `config={"research": True}`)."""
        glob = self._shared_global()  # all of θ_g, or its A tensors with personal_b (the client keeps its B)
        research = self.is_research_round(round_idx)
        config: dict[str, Any] = self._config({"research": True} if research else {})
        mask = self._masks.get(client_id)
        if mask is None and self.last_round is None:
            # Nothing aggregated yet: θ_g is still the run's seeded initial adapter, which the client regenerates from
            # the run config (docs/perfit.md, "Communication"), so nothing is sent: 0 bytes instead of the dense
            # expanded adapter (1,843,200 float32 = 7,372,800 B on SmolLM2-135M q/v, r=8, γ=4).
            config[SEEDED_INIT] = True
            return ClientInstruction(tensors={k: t.clone() for k, t in glob.items()}, mask=None, config=config)
        if mask is None or research:
            return ClientInstruction(tensors={k: t.clone() for k, t in glob.items()}, mask=None, config=config)
        tensors = _masked(glob, mask)
        return ClientInstruction(tensors=tensors, mask={k: m.clone() for k, m in mask.items()}, config=config)

    def _aggregate(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        full = self._require_global()
        glob = self._shared_global()
        # Validate everything before touching the server state.
        what = "tensor" if len(glob) == len(full) else "shared (LoRA A, personal_b) tensor"
        client_tensors = [self._check_update_tensors(u, glob, what) for u in updates]
        client_masks = [self._resolve_mask(u) for u in updates]

        num_clients = len(updates)
        fedavg = self._options["aggregation"] == "fedavg"
        weights = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
        new: dict[str, Tensor] = {}
        shared = exclusive = total = 0
        gram = torch.zeros(num_clients, num_clients, dtype=torch.float64)
        sq_change = 0.0
        for key, old in glob.items():
            masks = torch.stack([m[key] for m in client_masks])  # [K, *shape], bool
            values = torch.stack([t[key] for t in client_tensors]).to(torch.float64)
            w = weights.view(-1, *([1] * old.dim()))
            num = torch.where(masks, values, 0.0).mul_(w).sum(0)
            old64 = old.to(torch.float64)
            if fedavg:  # every client's weight, whether it kept the element or not (its value there is 0)
                agg = (num / weights.sum()).to(torch.float32)
            else:
                den = masks.to(torch.float64).mul_(w).sum(0)
                agg = torch.where(den > 0, num / den, old64).to(torch.float32)
            sq_change += float((agg.to(torch.float64) - old64).square().sum())
            new[key] = agg

            count = masks.sum(0)
            shared += int((count >= 2).sum())
            exclusive += int((count == 1).sum())
            total += old.numel()
            gram += _gram(masks.reshape(num_clients, -1))

        # personal_b: the B tensors are never aggregated; θ_g keeps their seeded init (a stateless client's start)
        self._global = {k: new.get(k, t) for k, t in full.items()}
        for u, m in zip(updates, client_masks, strict=True):
            self._masks[u.client_id] = m
        own = [bool(u.metrics.get(OWN_B, 0.0)) for u in updates]
        if self.select_b_rows:
            self._own_b.update({u.client_id: o for u, o in zip(updates, own, strict=True)})

        kept = gram.diagonal()
        return {
            "shared_fraction": shared / total,
            "exclusive_fraction": exclusive / total,
            "mask_jaccard": _mean_pairwise_jaccard(gram),
            "mean_density": float(kept.mean()) / total,
            "num_new_masks": float(sum(bool(u.mask_changed) for u in updates)),
            "num_clients": float(num_clients),
            "num_examples": float(weights.sum()),
            "update_norm": sq_change**0.5,
            **({"own_b_fraction": sum(own) / num_clients} if self.select_b_rows else {}),
        }

    def _resolve_mask(self, update: ClientUpdate) -> dict[str, Tensor]:
        """The mask to aggregate `update` with: the uploaded one when given, else the cached one."""
        if update.masks is None:
            if update.mask_changed:
                raise ValueError(f"client {update.client_id!r} set mask_changed=True but uploaded no masks.")
            cached = self._masks.get(update.client_id)
            if cached is None:
                raise ValueError(
                    f"client {update.client_id!r} uploaded no mask and the server has none cached for it: a client's "
                    "first PerFIT upload (and its first upload after a re-search) must carry `masks` with "
                    "`mask_changed=True`."
                )
            return cached
        return _check_masks(update.client_id, update.masks, self._shared_global())

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """As [`Strategy.state_dict`], plus every cached client mask as `mask/<client_id>/<key>` (bool tensors) and
        the list of those clients in `meta["mask_clients"]`."""
        tensors, meta = super().state_dict()
        meta["mask_clients"] = list(self._masks)
        if self._own_b:
            meta["own_b"] = dict(self._own_b)
        for cid, mask in self._masks.items():
            tensors.update({f"{MASK_PREFIX}{cid}/{k}": m.clone().contiguous() for k, m in mask.items()})
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the state saved by [`state_dict`] (global adapter and cached masks)."""
        super().load_state_dict(tensors, meta)
        clients = list(meta.get("mask_clients", []))
        if clients and self._global is None:
            raise ValueError("strategy state has client masks but no global adapter.")
        masks: dict[str, dict[str, Tensor]] = {}
        shared = self._shared_global() if self._global is not None else {}
        for cid in clients:
            found = {}
            for key in shared:
                name = f"{MASK_PREFIX}{cid}/{key}"
                if name not in tensors:
                    raise ValueError(f"strategy state is missing tensor {name!r}.")
                found[key] = tensors[name]
            masks[cid] = _check_masks(cid, found, shared)
        own_b = dict(meta.get("own_b", {}))
        if any(not isinstance(v, bool) for v in own_b.values()):
            raise ValueError(f"strategy state's own_b must map client ids to true/false, got {own_b!r}.")
        self._masks = masks
        self._own_b = own_b


def _check_masks(client_id: str, masks: Mapping[str, Tensor], glob: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Boolean CPU copies of `masks`, checked against the keys and shapes of the global adapter."""
    check_like_global(client_id, "mask", masks, glob)
    out = {}
    for key in glob:
        m = masks[key]
        m = m.detach().to("cpu")
        out[key] = (m if m.dtype == torch.bool else m != 0).clone().contiguous()
    return out


def _gram(flat_masks: Tensor) -> Tensor:
    """`G[i, j] = |m_i ∧ m_j|` for boolean rows `flat_masks` `[K, N]`, exact, as float64."""
    k, n = flat_masks.shape
    gram = torch.zeros(k, k, dtype=torch.float64)
    for start in range(0, n, _GRAM_CHUNK):
        chunk = flat_masks[:, start : start + _GRAM_CHUNK].to(torch.float32)
        gram += (chunk @ chunk.T).to(torch.float64)
    return gram


def _mean_pairwise_jaccard(gram: Tensor) -> float:
    """Mean over pairs `i < j` of `|m_i ∧ m_j| / |m_i ∨ m_j|` from the intersection matrix (1.0 if < 2 masks)."""
    k = gram.shape[0]
    if k < 2:
        return 1.0
    i, j = torch.triu_indices(k, k, offset=1)
    inter = gram[i, j]
    union = gram[i, i] + gram[j, j] - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))
    return float(jac.mean())
