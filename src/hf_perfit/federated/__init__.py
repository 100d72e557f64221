"""Federated instruction tuning: strategies, the client update, the in-process simulation (and the Flower apps).

```python
from hf_perfit.federated import FederatedConfig, run_federated

run_federated(FederatedConfig(strategy="perfit", dataset_name="builtin:stdlib", num_clients=8))
```
"""

from .client import client_update, evaluate_perplexity, train_client
from .config import FederatedArguments, FederatedConfig, load_config
from .messages import ClientInstruction, ClientUpdate
from .simulation import FederatedSimulation, run_federated
from .strategies import STRATEGIES, Strategy, get_strategy, register_strategy

__all__ = [
    "STRATEGIES",
    "ClientInstruction",
    "ClientUpdate",
    "FederatedArguments",
    "FederatedConfig",
    "FederatedSimulation",
    "Strategy",
    "client_update",
    "evaluate_perplexity",
    "get_strategy",
    "load_config",
    "register_strategy",
    "run_federated",
    "train_client",
]
