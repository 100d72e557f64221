"""`perfit push`: `cards` renders the model cards, `push` each repo's folder and uploads it (docs/hub.md)."""

from .cards import STRATEGY_DESCRIPTIONS, STRATEGY_NAMES
from .push import (
    HubPushError,
    PushConfig,
    PushReport,
    RepoResult,
    client_repo_id,
    parse_repo_prefix,
    push_main,
    push_run,
)

__all__ = ["STRATEGY_DESCRIPTIONS", "STRATEGY_NAMES", "HubPushError", "PushConfig", "PushReport", "RepoResult"]
__all__ += ["client_repo_id", "parse_repo_prefix", "push_main", "push_run"]
