"""Taylor importance scores, their EMA, the pruning schedule and the global top-k mask (docs/perfit.md § Importance
and the schedule).

Everything here works on plain `{name: tensor}` dicts, so it is reusable outside PEFT and easy to test.
"""

from __future__ import annotations

import math

import torch

from .config import IMPORTANCE_KINDS


def taylor_score(param: torch.Tensor, grad: torch.Tensor, order: int) -> torch.Tensor:
    """Element-wise Taylor importance of `param` with gradient `grad`, in float32.

    `order=1`: `|θ·g|` (first-order, SNIP-like). `order=2`: `½(θ·g)²` (diagonal-Fisher second order).
    """
    prod = param.detach().float() * grad.detach().float()
    if order == 1:
        return prod.abs_()
    if order == 2:
        return prod.square_().mul_(0.5)
    raise ValueError(f"order={order} is not supported; allowed: 1, 2.")


class ImportanceTracker:
    """EMA of Taylor scores over the batches seen since the last [`reset`].

    Args:
        kind (`str`): `"taylor1"`, `"taylor2"` or `"mixed"` (keeps both EMAs, combines them by global rank).
        beta (`float`): EMA coefficient; the first batch after a reset sets the score directly.
    """

    def __init__(self, kind: str, beta: float) -> None:
        if kind not in IMPORTANCE_KINDS:
            raise ValueError(f"importance={kind!r} is not supported; allowed values: {IMPORTANCE_KINDS}.")
        self.kind = kind
        self.beta = float(beta)
        self.orders = {"taylor1": (1,), "taylor2": (2,), "mixed": (1, 2)}[kind]
        self._ema: dict[int, dict[str, torch.Tensor]] = {o: {} for o in self.orders}
        self.num_batches = 0

    def reset(self) -> None:
        """Forget all scores (called after each pruning iteration)."""
        self._ema = {o: {} for o in self.orders}
        self.num_batches = 0

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> bool:
        """Fold the current `.grad` of each parameter into the EMA. Returns False if no gradient was present."""
        seen = False
        for name, p in params.items():
            if p.grad is None:
                continue
            seen = True
            for order in self.orders:
                s = taylor_score(p, p.grad, order)
                ema = self._ema[order]
                if name in ema:
                    ema[name].mul_(self.beta).add_(s, alpha=1.0 - self.beta)
                else:
                    ema[name] = s
        if seen:
            self.num_batches += 1
        return seen

    def scores(self) -> dict[str, torch.Tensor]:
        """The current importance per element (higher = more important). Raises if nothing was observed."""
        if self.num_batches == 0:
            raise RuntimeError(
                "no importance scores yet: run a backward pass and call `before_optimizer_step()` (or train with "
                "PerFITPruningCallback) before pruning, or pass `scores=` explicitly."
            )
        if self.kind != "mixed":
            return dict(self._ema[self.orders[0]])
        names = list(self._ema[1])
        flat1 = torch.cat([self._ema[1][n].flatten() for n in names])
        flat2 = torch.cat([self._ema[2][n].flatten() for n in names])
        ranks = _ranks(flat1) + _ranks(flat2)
        return _unflatten(ranks, {n: self._ema[1][n] for n in names})


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks of `x` (ascending), as float32; ties broken by position."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(x.numel(), device=x.device)
    return ranks.float()


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def prune_steps(search_steps: int, iterations: int) -> list[int]:
    """The optimizer steps (1-based) after which a pruning iteration runs: `iterations` evenly spaced points
    ending at `search_steps`. Distinct when `search_steps >= iterations`."""
    return [round(i * search_steps / iterations) for i in range(1, iterations + 1)]


def keep_schedule(total: int, budget: int, iterations: int) -> list[int]:
    """Elements kept after each pruning iteration: density `d_f^(i/n)`, geometric from 1 to `d_f = budget/total`,
    the last entry exactly `budget`."""
    if not 0 < budget <= total:
        raise ValueError(f"budget={budget} must be in (0, total={total}].")
    final = budget / total
    counts = [
        max(budget, min(total, math.floor(total * final ** (i / iterations) + 0.5))) for i in range(1, iterations)
    ]
    return counts + [budget]


@torch.no_grad()
def global_topk_masks(
    scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], num_keep: int
) -> dict[str, torch.Tensor]:
    """Keep the `num_keep` highest-scoring elements among those currently kept, with one threshold shared by all
    tensors (so the per-layer allocation is decided by the scores). Exactly `num_keep` elements are kept: ties at
    the threshold are broken by position, deterministically.
    """
    names = list(masks)
    missing = [n for n in names if n not in scores]
    if missing:
        raise KeyError(f"no scores for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    kept_now = sum(int(masks[n].sum()) for n in names)
    if not 0 < num_keep <= kept_now:
        raise ValueError(f"num_keep={num_keep} must be in (0, currently kept={kept_now}].")
    flat = torch.cat([scores[n].detach().float().flatten().to(masks[n].device) for n in names])
    flat_mask = torch.cat([masks[n].flatten() for n in names])
    flat = torch.where(flat_mask, torch.nan_to_num(flat, nan=0.0), torch.tensor(-math.inf, device=flat.device))
    # Stable order gives deterministic tie-breaking: among equal scores the earlier element is dropped first.
    order = torch.argsort(flat, stable=True)
    new_flat = torch.zeros_like(flat_mask)
    new_flat[order[flat.numel() - num_keep :]] = True
    return {n: m.view_as(masks[n]) for n, m in _unflatten(new_flat, masks).items()}
