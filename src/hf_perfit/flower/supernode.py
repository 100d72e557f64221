"""`flower-supernode` with a shorter message poll: `python -m hf_perfit.flower.supernode [flower-supernode args]`.

Flower 1.41's SuperNode asks the SuperLink for a new message, and when there is none waits a fixed **3 s** before
asking again; while its ClientApp works it checks for the reply every **0.5 s**; and when it downloads a message's
arrays before the server finished uploading them, it retries after **1 s** (doubling). All three are fixed in
`flwr.supernode.start_client_internal` (`time.sleep(3)`, `time.sleep(0.5)`, `pull_objects`' default first
backoff), with no option to change them. Each phase of a round (train, then evaluate) therefore waits seconds on
every node, however fast the ClientApp answers: with a small model that wait, not the work, is the round time
(`docs/benchmarks.md`, "Flower overhead").

This launcher runs Flower's own `flower-supernode` entry point with those waits capped at `--poll-interval`
seconds (default 0.1): that one module gets a `time` whose `sleep(s)` sleeps `min(s, cap)`, and a `pull_objects`
whose first retry comes after 20 ms (doubling up to the cap). Everything else is Flower's SuperNode, unchanged. The
cost: an idle node asks the SuperLink for messages `1 / cap` times a second instead of once every 3 s (one small
HTTP request each); with hundreds of nodes on one SuperLink, raise the cap.

It patches a private detail of Flower 1.41 (the pinned `flwr>=1.41,<1.42`) and refuses any other version.
"""

from __future__ import annotations

import functools
import sys
import time
from types import SimpleNamespace

__all__ = ["capped_time", "main"]

DEFAULT_CAP = 0.1


def capped_time(cap: float) -> SimpleNamespace:
    """A stand-in for the `time` module whose `sleep(s)` sleeps `min(s, cap)`; every other attribute is `time`'s."""

    class _Time(SimpleNamespace):
        def __getattr__(self, name: str):
            return getattr(time, name)

    return _Time(sleep=lambda seconds: time.sleep(min(float(seconds), cap)))


def main(argv: list[str] | None = None) -> None:
    """Run `flower-supernode` with the arguments given (minus `--poll-interval SECONDS`) and capped polls."""
    import flwr
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if not flwr.__version__.startswith("1.41."):
        raise SystemExit(
            f"hf_perfit.flower.supernode patches Flower 1.41's SuperNode, but flwr {flwr.__version__} is installed; "
            "use plain `flower-supernode` (or install flwr>=1.41,<1.42)."
        )
    args = list(sys.argv[1:] if argv is None else argv)
    cap = DEFAULT_CAP
    if "--poll-interval" in args:
        i = args.index("--poll-interval")
        try:
            cap = float(args[i + 1])
        except (IndexError, ValueError):
            raise SystemExit("--poll-interval needs a number of seconds, e.g. --poll-interval 0.1.") from None
        if not 0 < cap <= 3:
            raise SystemExit(f"--poll-interval {cap} must be in (0, 3] seconds.")
        del args[i : i + 2]
    internal.time = capped_time(cap)
    internal.pull_objects = functools.partial(internal.pull_objects, initial_backoff=min(0.02, cap), backoff_cap=cap)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
