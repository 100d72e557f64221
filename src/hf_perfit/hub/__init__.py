"""Publishing a finished federated run on the Hugging Face Hub (`perfit push`): `run` reads the run back, `cards`
renders the model cards from `model_cards/*.md`, `push` renders each repo into a folder and uploads it with
`huggingface_hub`. See docs/hub.md."""

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

__all__ = [
    "STRATEGY_DESCRIPTIONS",
    "STRATEGY_NAMES",
    "HubPushError",
    "PushConfig",
    "PushReport",
    "RepoResult",
    "client_repo_id",
    "parse_repo_prefix",
    "push_main",
    "push_run",
]
