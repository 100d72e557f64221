"""A Flower client's own state between rounds, on its own disk: never sent to the server.

One safetensors file per round the client trained (`round_{r}.safetensors`: LoRA tensors under `t/`, masks as
uint8 under `m/`, the search progress as JSON metadata: the simulation's format), written atomically.

Rounds are *transactional*: the server tells the client, in every message, the last round whose upload it accepted
(`state-round`), and the client starts from exactly that version. A round whose reply was lost (the client
crashed, timed out, or its upload was refused) therefore leaves no trace: the client and the server never disagree
on its adapter or its PerFIT mask. Versions older than the accepted one are deleted; so are rejected ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..federated.client import AdapterState

__all__ = ["ClientStateStore"]


class ClientStateStore:
    """Versioned adapter state of one client.

    Args:
        root (`str` or `os.PathLike`): the client's own state folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _path(self, round_idx: int) -> Path:
        return self.root / f"round_{int(round_idx)}.safetensors"

    def versions(self) -> list[int]:
        """The rounds with a stored version, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob("round_*.safetensors"):
            try:
                out.append(int(p.stem.split("_", 1)[1]))
            except ValueError:
                continue
        return sorted(out)

    def reset(self) -> None:
        """Forget every version (a new run starts)."""
        if self.root.exists():
            shutil.rmtree(self.root)

    def load(self, round_idx: int | None) -> AdapterState | None:
        """The state the client had after round `round_idx`; `None` (or a negative round) means "no state yet".

        Raises:
            FileNotFoundError: the server accepted round `round_idx` from this client, but its version is gone (its
                state folder was deleted or belongs to another machine).
        """
        if round_idx is None or round_idx < 0:
            return None
        path = self._path(round_idx)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: the server accepted this client's round {round_idx}, but its state is gone "
                f"(stored versions: {self.versions()}). Was the client's state folder deleted during the run?"
            )
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        blob = load_file(str(path))
        tensors = {k[2:]: v for k, v in blob.items() if k.startswith("t/")}
        masks = {k[2:]: v.bool() for k, v in blob.items() if k.startswith("m/")}
        return tensors, masks, meta

    def save(self, round_idx: int, state: AdapterState, keep: int | None = None) -> Path:
        """Write the state after round `round_idx` atomically, then delete every other version but `keep` (the last
        accepted one, still needed if this round's upload is lost).

        Returns:
            `Path`: the written file.
        """
        tensors, masks, meta = state
        blob = {f"t/{k}": v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        blob.update({f"m/{k}": m.detach().to("cpu", torch.uint8).contiguous() for k, m in (masks or {}).items()})
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(round_idx)
        tmp = self.root / f".{path.name}.tmp"
        save_file(blob, str(tmp), metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)
        for r in self.versions():
            if r != round_idx and r != keep:
                self._path(r).unlink(missing_ok=True)
        return path
