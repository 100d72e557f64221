"""A Flower client's own state between rounds, on its own disk: never sent to the server.

The store itself lives in [`hf_perfit.federated.run`] (one module owns a run's file layout); it is re-exported here so
Flower code keeps importing it from `hf_perfit.flower.state`.

Rounds are *transactional*: the server tells the client, in every message, the last round whose upload it accepted
(`state-round`), and the client starts from exactly that version. A round whose reply was lost (the client
crashed, timed out, or its upload was refused) therefore leaves no trace: the client and the server never disagree
on its adapter or its PerFIT mask. Versions older than the accepted one are deleted; so are rejected ones.
"""

from __future__ import annotations

from ..federated.run import ClientStateStore

__all__ = ["ClientStateStore"]
