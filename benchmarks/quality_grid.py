"""The grid of benchmarks/quality_scale.py, declared once: its settings (a data partition, its rows and its
federated schedule in benchmarks/settings/<setting>.yaml) and its methods (strategies and PerFIT variants as changes of
`FederatedConfig` keys); and its cells (setting, seed, method): where each lives, its config, the finished run a
fine-tuned row forks from, its progress and estimate, and the lock that makes a cell one process's."""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
import quality_run as qrun  # noqa: E402
import quality_setup as qset  # noqa: E402
from _report import REPO_ROOT  # noqa: E402
from quality_partition import write_partition  # noqa: E402

DEFAULT_ROOT = REPO_ROOT / "outputs" / "quality"
TINY_ROOT = REPO_ROOT / "outputs" / "quality-scale-tiny"
IMPORTED_FILE = "imported.json"  # a cell trained elsewhere (a GPU session): records only, never resumed or forked
HETERO_CYCLE = (0.5, 1.0, 1.0, 1.5)  # perfit_hetero: b_k by client index, mean 1 (the rank-r budget on average)
# Rough rates for the plan's estimates, on this 2-core machine with 1 thread per cell. Measured first at load 3-5
# (flan8_recipe seed 0, local, round 1, 2026-11-28): 5.2 s per step of batch 4 (the per-client trainer setup
# included) and 22 s per client evaluation of 50 test examples. Since the response-positions change (the LM head
# projects only the scored positions: benchmarks/response_positions.py measured a step at 0.64x and an evaluation at
# 0.76x) that is 3.3 s and 17 s; a local round of flan8_recipe seed 1 (8 x 10 steps + 8 evaluations, estimate 400 s)
# then took 298-324 s beside one other cell (load ~2, 2026-11-29), so these stay on the safe side. ROUGE-L: 50 greedy
# answers of <= 32 tokens per client, ~2.5 min for 8 clients at low load (benchmarks/quality.py), doubled for load.
SEC_PER_STEP = 3.3
SEC_PER_EVAL = 17.0
SEC_PER_ROUGE = 40.0
BUSY_S = 15 * 60  # a cell written to this recently, not by us, is taken to be running elsewhere
TINY_PARTITION_CLIENTS = 4


# ---------------------------------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Setting:
    """One table's data and rows; its federated schedule (rounds, sampled fraction, local steps, batch, lr, rank-r
    budget, evaluated examples: `FederatedConfig` keys) is benchmarks/settings/<name>.yaml ([`config_path`]), which
    every method of the table runs with.

    Args:
        name (`str`): the key in quality.json, the folder under the root and the settings YAML's name.
        about (`str`): one line for the docs.
        partition (`str`): `flan8` (the 8 category clients as they are), `dirichlet` or `iid` (FLAN-8's pooled
            training and test rows dealt to `num_clients` clients with the same proportions, benchmarks/
            quality_partition.py).
        num_clients (`int`), alpha (`float`): the partition's size and Dirichlet concentration.
        rouge_examples (`int`, 0: no ROUGE-L): as benchmarks/quality.py's `--rouge-examples`.
        methods (`tuple[str, ...]`): the table's rows; `ablations` (`tuple[str, ...]`): a second table's rows.
        same_as (`str`, *optional*): another setting with the same data and schedule: its cells (and YAML) are
            this one's.
    """

    name: str
    about: str
    partition: str = "flan8"
    num_clients: int = 8
    alpha: float | None = None
    rouge_examples: int = 0
    methods: tuple[str, ...] = ("local", "fedit", "perfit")
    ablations: tuple[str, ...] = ()
    same_as: str | None = None


MAIN = ("local", "fedit", "fedit_ft", "fedprox", "perfit", "perfit_train", "fedqp", "fedmut", "fedamole")
ABLATIONS = (
    "perfit",
    "perfit_zeroinit",
    "perfit_g1",
    "perfit_g2",
    # γ = 8: does the lead over FedIT keep growing with the room to keep different elements (γ = 1, 2, 4 did)?
    "perfit_g8",
    "perfit_taylor2",
    "perfit_mixed",
    "perfit_fedavg",
    "perfit_hetero",
    # PerFIT's named variants (docs/perfit.md, "Variants"), each one change away from `perfit`, which isolates it:
    # perfit_pb differs from perfit only in B's aggregation (never: each client keeps its own), perfit_ft only in the
    # fine-tuning after the last round; perfit_pb_ft is both, one change away from perfit_pb (and from perfit_ft).
    "perfit_pb",
    "perfit_ft",
    "perfit_pb_ft",
    # perfit_bsel differs from perfit only in each client's choice of B at a round's start (the server's or its own,
    # by the loss on SELECT_B_ROWS held-out training rows), and from perfit_pb in that B is still aggregated
    "perfit_bsel",
    # perfit_bsel_ft: perfit_bsel, then the fine-tuning of the *_ft rows (one change away from perfit_bsel): does the
    # round of local steps that puts perfit_pb_ft below perfit_pb do the same for the row that keeps the IID half?
    "perfit_bsel_ft",
    # the two lowest variants with γ = 8 (one change away from each: expansion_factor), since γ = 8 put faithful
    # PerFIT 1.9% below γ = 4 on flan8_recipe (seeds 0-1): does the same step take them below local?
    "perfit_pb_g8",
    "perfit_bsel_g8",
)
# PerFIT's named variants (the ablations from perfit_pb on): the report states the goal for each, next to perfit
VARIANTS = ABLATIONS[ABLATIONS.index("perfit_pb") :]
SWEEP = ("local", "fedit", "perfit")
PAPER = ("local", "fedit", "fedit_ft", "fedprox", "perfit")  # the paper's regime: 40 Dirichlet clients, sampled
# The 40-client settings' second table: the variant rows that lead on flan8_recipe, beside `perfit`, so the variant
# docs/perfit.md recommends is measured where the clients share tasks too (the goal's IID half included). In a
# sampled setting the fine-tuning round trains every client once more: 10 steps on top of its ~4 sampled rounds.
# The γ = 8 rows are the two lowest on flan8_recipe (seeds 0-1); on IID they say whether γ = 8 keeps personal B's loss
# (1.090× FedIT at γ = 4) or selected B's tie (0.994×).
VARIANT_ROWS = (
    "perfit",
    "perfit_pb",
    "perfit_pb_ft",
    "perfit_bsel",
    "perfit_bsel_ft",
    "perfit_pb_g8",
    "perfit_bsel_g8",
)
# perfit_bsel's held-out rows per client: 2% of a FLAN-8 client's 300 rows, 10% of an IID client's 60, and 4 rows
# left to train on for the smallest Dirichlet(0.5) client (10 rows)
SELECT_B_ROWS = 6
TINY_SELECT_B_ROWS = 1
# 40 clients at 20% for 20 rounds and at 5% for 80 rounds: both 160 client-rounds, so each client trains in ~4 rounds
# (40 local steps, ~2.7 epochs of its ~60 rows) in either, and the two differ in how many clients each aggregation
# sees (8 or 2), not in how much training a client gets.
_D40 = dict(partition="dirichlet", num_clients=40, alpha=0.5)
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "flan8_recipe",
            "FLAN-8 (one task category per client, 300 training rows, its own test split) at the recipes' scale, "
            "8 clients",
            rouge_examples=50,
            methods=MAIN,
            ablations=ABLATIONS,
        ),
        Setting(
            "dirichlet40_f20",
            "the paper's regime: 40 clients from a Dirichlet(0.5) partition of FLAN-8's training rows (test rows "
            "dealt with the same proportions), 8 sampled per round",
            methods=PAPER,
            ablations=VARIANT_ROWS,
            **_D40,
        ),
        Setting(
            "dirichlet40_f05",
            "the paper's regime: 40 clients from a Dirichlet(0.5) partition of FLAN-8, 2 sampled per round (the same "
            "160 client-rounds as dirichlet40_f20)",
            methods=PAPER,
            ablations=VARIANT_ROWS,
            **_D40,
        ),
        Setting(
            "alpha0.1",
            "heterogeneity sweep: 40 clients, Dirichlet(0.1) partition of FLAN-8",
            methods=SWEEP,
            ablations=VARIANT_ROWS,
            **{**_D40, "alpha": 0.1},
        ),
        Setting(
            "alpha0.5",
            "heterogeneity sweep, α = 0.5: the cells of dirichlet40_f20",
            methods=SWEEP,
            ablations=VARIANT_ROWS,
            same_as="dirichlet40_f20",
            **_D40,
        ),
        Setting(
            "alpha1.0",
            "heterogeneity sweep: 40 clients, Dirichlet(1.0) partition of FLAN-8",
            methods=SWEEP,
            ablations=VARIANT_ROWS,
            **{**_D40, "alpha": 1.0},
        ),
        Setting(
            "iid",
            "heterogeneity sweep: 40 clients, IID partition of FLAN-8 (60 training, 40 test rows each)",
            methods=SWEEP,
            ablations=VARIANT_ROWS,
            **{**_D40, "partition": "iid", "alpha": None},
        ),
    )
}


@dataclass(frozen=True)
class Method:
    """A row: a benchmarks/quality.py method (`base`), with `FederatedConfig` keys over the setting's YAML
    (`overrides`, read as the YAML's are: PerFIT's keys count for PerFIT's rows) and set on the finished config
    (`config`; the value `"local_steps"` stands for the setting's local steps). A row with `finetune_steps` names
    the row it continues (`fork_of`: its rounds are that row's, see [`fork_source`])."""

    base: str
    about: str
    overrides: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fork_of: str | None = None


METHODS: dict[str, Method] = {
    "local": Method("local", "every client trains its own rank-r LoRA, no communication"),
    "fedit": Method("fedit", "FedAvg of rank-r LoRAs (FedIT)"),
    "fedit_ft": Method(
        "fedit",
        "FedIT, then every client fine-tunes the global adapter for one round's local steps",
        config={"finetune_steps": "local_steps"},
        fork_of="fedit",
    ),
    "fedprox": Method("fedprox", "FedIT with FedProx's proximal term (μ of the recipe)"),
    "perfit": Method("perfit", "PerFIT as the paper: γ = 4, symmetric init, taylor1, foresight search"),
    "perfit_train": Method(
        "perfit", "PerFIT with the search during the first round's training", {"search_mode": "train"}
    ),
    "fedqp": Method("fedqp", "FedQP (recipe options)"),
    "fedmut": Method("fedmut", "FedMut (recipe options)"),
    "fedamole": Method("fedamole", "FedAMoLE, the authors' expert pool (parameters per client stated)"),
    "perfit_zeroinit": Method(
        "perfit", "PerFIT with PEFT's zero init (B = 0) instead of symmetric", config={"perfit_init": "zero"}
    ),
    "perfit_g1": Method("perfit", "PerFIT with γ = 1 (no expansion: nothing to search)", {"expansion_factor": 1}),
    "perfit_g2": Method("perfit", "PerFIT with γ = 2", {"expansion_factor": 2}),
    "perfit_g8": Method("perfit", "PerFIT with γ = 8", {"expansion_factor": 8}),
    "perfit_taylor2": Method("perfit", "PerFIT with taylor2 importance", {"importance": "taylor2"}),
    "perfit_mixed": Method("perfit", "PerFIT with mixed importance", {"importance": "mixed"}),
    "perfit_fedavg": Method(
        "perfit",
        "PerFIT with plain FedAvg of the masked adapters",
        config={"strategy_options": {"aggregation": "fedavg"}},
    ),
    "perfit_hetero": Method(
        "perfit",
        f"PerFIT with budget multipliers {', '.join(f'{b:g}' for b in HETERO_CYCLE)} by client index (mean 1)",
        config={"budget_multipliers": "hetero"},
    ),
    "perfit_pb": Method(
        "perfit",
        "variant PerFIT with personal B: only the LoRA A matrices are aggregated (per element, over the clients that "
        "kept them) and sent; every client keeps its own masked B (FedSA-LoRA's split); perfit otherwise",
        config={"strategy_options": {"personal_b": True}},
    ),
    "perfit_ft": Method(
        "perfit",
        "variant PerFIT, then every client fine-tunes its personalized (masked) adapter for one round's local steps",
        config={"finetune_steps": "local_steps"},
        fork_of="perfit",
    ),
    "perfit_pb_ft": Method(
        "perfit",
        "variant perfit_pb, then every client fine-tunes its personalized adapter (shared A, its own B) for one "
        "round's local steps",
        config={"strategy_options": {"personal_b": True}, "finetune_steps": "local_steps"},
        fork_of="perfit_pb",
    ),
    "perfit_bsel": Method(
        "perfit",
        f"variant PerFIT with selected B: aggregated as perfit, but every client holds {SELECT_B_ROWS} training rows "
        "out and starts each round from the LoRA B (the server's or its own) with the lower loss on them",
        config={"strategy_options": {"select_b_rows": SELECT_B_ROWS}},
    ),
    "perfit_bsel_ft": Method(
        "perfit",
        "variant perfit_bsel, then every client fine-tunes for one round's local steps from the start its rule "
        "picks (the server's B or its own, by the loss on its held-out rows)",
        config={"strategy_options": {"select_b_rows": SELECT_B_ROWS}, "finetune_steps": "local_steps"},
        fork_of="perfit_bsel",
    ),
    "perfit_pb_g8": Method(
        "perfit",
        "variant perfit_pb with γ = 8",
        config={"strategy_options": {"personal_b": True}, "expansion_factor": 8},
    ),
    "perfit_bsel_g8": Method(
        "perfit",
        "variant perfit_bsel with γ = 8",
        config={"strategy_options": {"select_b_rows": SELECT_B_ROWS}, "expansion_factor": 8},
    ),
}
GROUPS = {"main": None, "ablations": None, "all": None}  # resolved per setting in [`methods_of`]


def methods_of(setting: Setting, names: list[str] | None) -> list[str]:
    """The methods asked for: names, or `main` (default), `ablations`, `all` of the setting's rows."""
    names = names or ["main"]
    out: list[str] = []
    for n in names:
        group = {"main": setting.methods, "ablations": setting.ablations, "all": setting.methods + setting.ablations}
        for m in group.get(n, (n,)):
            if m not in METHODS:
                raise SystemExit(f"--methods {m}: unknown; allowed: {', '.join([*GROUPS, *METHODS])}.")
            if m not in out:
                out.append(m)
    return out


# ---------------------------------------------------------------------------------------------------- cells


def storage(setting: Setting) -> Setting:
    """The setting whose folder holds this one's cells (`same_as`, else itself)."""
    return SETTINGS[setting.same_as] if setting.same_as else setting


def cell_dir(root: Path, setting: Setting, seed: int, method: str) -> Path:
    return root / storage(setting).name / f"seed{seed}" / method


def config_path(setting: Setting) -> Path:
    """The setting's federated settings: benchmarks/settings/<name>.yaml (of the setting whose cells it shares)."""
    return qset.SETTINGS_DIR / f"{storage(setting).name}.yaml"


@functools.cache
def schedule(setting: Setting):
    """The setting's YAML as a `FederatedConfig` (no method, no `--tiny`): its rounds, fraction, steps, ..."""
    return qset.Settings(config=str(config_path(setting))).federated()


def base_settings(
    setting: Setting, seed: int, data: Path, tiny: bool, overrides: list[str] | None = None
) -> qset.Settings:
    """benchmarks/quality.py's settings of a cell (before the method's changes): the setting's YAML, `--seed`, then
    the command line's `overrides` (`--key value` flags of `FederatedConfig` keys)."""
    return qset.Settings(
        config=qset._rel(config_path(setting)),
        overrides=["--seed", str(seed), *(overrides or [])],
        rouge_examples=(2 if tiny else setting.rouge_examples) if setting.rouge_examples else 0,
        data=str(data),
        tiny=tiny,
        **({k: v for k, v in qset.TINY_DEFAULTS.items() if k != "rouge_examples"} if tiny else {}),
    )


def data_for(setting: Setting, root: Path, flan8: Path, tiny: bool) -> Path:
    """The per-client folder of a setting (a partition is written once under `<root>/<setting>/data`)."""
    setting = storage(setting)
    source = flan8
    if tiny:
        source = qset.write_tiny_clients(root / "tiny_source")
    elif not (flan8 / "test.jsonl").is_file():
        raise SystemExit(f"--flan8 {flan8}: no FLAN-8 client folder there (local_training_{{k}}.json + test.jsonl).")
    if setting.partition == "flan8":
        return source.resolve()
    return write_partition(
        source,
        root / setting.name / "data",
        TINY_PARTITION_CLIENTS if tiny else setting.num_clients,
        setting.partition,
        setting.alpha,
        seed=0,  # one partition for every seed: seeds vary training, and per-client comparisons stay paired
        min_train=2 if tiny else 4,  # one batch
        min_test=1 if tiny else 2,
    ).resolve()


def sampled_count(num_clients: int, fraction: float) -> int:
    return max(1, round(fraction * num_clients))  # as Coordinator.sample


def cell_config(
    setting: Setting,
    method: str,
    seed: int,
    root: Path,
    data: Path,
    tiny: bool,
    overrides: list[str] | None = None,
):
    """`(FederatedConfig, quality.py settings, FedAMoLE pool or None)` of one cell (`overrides`: the command line's
    `--key value` flags)."""
    spec = METHODS[method]
    s = base_settings(setting, seed, data, tiny, overrides)
    num_clients = len(list(data.glob("local_training_*.json*")))
    budget = None
    if spec.base == "fedamole":
        common = s.federated(spec.overrides)
        budget = qset.fedamole_pool(
            qset.target_shapes(s, common.lora_target_modules),
            common.lora_r,
            sampled_count(num_clients, common.fraction_clients),
            qset._recipe("fedamole"),
            rank=s.fedamole_rank,
            num_experts=s.fedamole_experts,
        )
    out = cell_dir(root, setting, seed, method)
    config = qset.method_config(spec.base, s, data, out, budget, spec.overrides)
    for key, value in spec.config.items():
        if value == "local_steps":
            value = config.local_steps
        elif value == "hetero":
            value = [HETERO_CYCLE[k % len(HETERO_CYCLE)] for k in range(num_clients)]
        elif tiny and key == "strategy_options" and "select_b_rows" in value:
            value = {**value, "select_b_rows": TINY_SELECT_B_ROWS}  # a tiny Dirichlet client may hold 4 rows
        setattr(config, key, value)
    config.validate()
    return config, s, budget


def fork_source(folder: Path, config) -> Path | None:
    """For a cell with `finetune_steps > 0` (the `*_ft` rows): the finished cell of the same seed whose config differs
    only in `finetune_steps` (the row's `Method.fork_of`), else `None`. Its rounds are exactly this cell's first
    `num_rounds` rounds:
    `finetune_steps` changes nothing before the fine-tuning phase (same sampling, seeds, strategy and evaluation)."""
    if not config.finetune_steps or not folder.parent.is_dir():
        return None
    for other in sorted(folder.parent.iterdir()):
        if (
            other == folder
            or not (other / "state" / "checkpoint.json").is_file()
            or not (other / "results.md").is_file()
            or (other / IMPORTED_FILE).is_file()  # its tensors stayed where it ran: nothing to continue from
        ):
            continue
        saved = json.loads((other / "state" / "checkpoint.json").read_text())
        old = qset._comparable({**qset.config_defaults(), **saved["config"]})
        new = qset._comparable(config.to_dict())
        if {**old, "finetune_steps": config.finetune_steps} == new and int(
            saved["completed_rounds"]
        ) == config.num_rounds:
            return other
    return None


def fork_finetune(source: Path, folder: Path, config) -> None:
    """Start `folder` as a copy of the finished run `source` after its last round (state, records, wall time),
    with this cell's config, so that resuming it runs only the fine-tuning phase: what a run of this config killed
    right after its last round would resume from. The wall time keeps the source's rounds (what the cell cost)."""
    import shutil

    from hf_perfit._io import atomic_directory, atomic_write_json

    with atomic_directory(folder) as tmp:
        shutil.copytree(source / "state", tmp / "state")
        for name in ("metrics.jsonl", qrun.WALL_FILE, qset.SETTINGS_FILE):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        config_dict = {**config.to_dict(), "resume": False, "overwrite": False}
        atomic_write_json(tmp / "config.json", config_dict)
        pointer = json.loads((tmp / "state" / "checkpoint.json").read_text())
        pointer["config"] = config_dict
        atomic_write_json(tmp / "state" / "checkpoint.json", pointer)


def completed_rounds(folder: Path) -> int:
    path = folder / "state" / "checkpoint.json"
    return int(json.loads(path.read_text())["completed_rounds"]) if path.is_file() else 0


def total_rounds(config) -> int:
    return config.num_rounds + (1 if config.finetune_steps > 0 else 0)


def estimate_s(config, done: int, base: bool = True) -> float:
    """Rough CPU seconds left for a cell: client steps at `SEC_PER_STEP`, evaluations at `SEC_PER_EVAL` (the
    per-client trainer setup is inside both, as measured); `base=False` for a cell that reads the base model's
    evaluation from its setting's cache (benchmarks/base_eval_cache.py)."""
    n = config.num_clients
    k = sampled_count(n, config.fraction_clients)
    rounds_left = max(0, config.num_rounds - done)
    steps = rounds_left * k * config.local_steps
    evals = rounds_left * k + (n - k if rounds_left else 0) + (n if done == 0 and base else 0)
    if config.finetune_steps and done <= config.num_rounds:
        steps += n * config.finetune_steps
        evals += n
    return steps * SEC_PER_STEP + evals * SEC_PER_EVAL * min(1.0, config.max_eval_examples / 50)


def table_cost_h(setting: Setting, methods: tuple[str, ...], seeds: int = 3, computed: tuple[str, ...] = ()) -> float:
    """Rough CPU hours of a whole table from scratch (`estimate_s` per cell, plus ROUGE-L where the setting has it); a
    fine-tuned row whose source row is among `methods` or `computed` (rows computed anyway) costs only its fine-tuning,
    and the base model's evaluation is counted once (the other cells read it from the setting's cache)."""
    from types import SimpleNamespace

    total = 0.0
    plan = schedule(setting)
    for m in methods:
        ft = plan.local_steps if METHODS[m].config.get("finetune_steps") else 0
        config = SimpleNamespace(
            num_clients=setting.num_clients,
            fraction_clients=plan.fraction_clients,
            num_rounds=plan.num_rounds,
            local_steps=plan.local_steps,
            finetune_steps=ft,
            max_eval_examples=plan.max_eval_examples,
        )
        rouge = setting.num_clients * SEC_PER_ROUGE if setting.rouge_examples else 0.0
        # forked from the same seed's run of the row it continues (`fork_finetune`) when that row is in the table
        done = plan.num_rounds if ft and METHODS[m].fork_of in (*methods, *computed) else 0
        total += seeds * (estimate_s(config, done, base=False) + rouge)
    if not computed:  # the base model's evaluation, once (with `computed`, those rows' cells paid it)
        total += setting.num_clients * SEC_PER_EVAL * min(1.0, plan.max_eval_examples / 50)
    return total / 3600


def newest_write(folder: Path) -> float:
    """The newest modification time of the run's progress files (0 when none)."""
    paths = [folder / "metrics.jsonl", folder / "state" / "checkpoint.json", folder / qrun.WALL_FILE]
    state = folder / "state"
    if state.is_dir():
        for p in state.glob("pending_*"):
            paths += [p, *p.iterdir()]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def quality_py_jobs() -> dict[Path, tuple[int, set[str]]]:
    """The running `benchmarks/quality.py` processes of this machine: `{output root: (pid, methods)}` (read from
    /proc; empty where there is none). Such a job computes its methods' runs in `<output root>/<method>` without
    taking [`CellLock`], so `run` leaves those cells alone."""
    jobs: dict[Path, tuple[int, set[str]]] = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("benchmarks/quality.py") or a == "quality.py" for a in argv):
            continue
        try:
            args, _ = q.parse_args([a for a in argv[[a.endswith("quality.py") for a in argv].index(True) + 1 :] if a])
        except SystemExit:
            continue
        if args.output_root is not None:
            try:
                cwd = Path(os.readlink(cmdline.parent / "cwd"))
            except OSError:  # another user's process: a relative --output-root cannot be resolved
                cwd = Path("/")
            out = args.output_root if args.output_root.is_absolute() else cwd / args.output_root
            jobs[out.resolve()] = (int(cmdline.parent.name), set(args.methods))
    return jobs


class CellLock:
    """`<cell>.lock` next to a cell's folder, held while this process computes the cell; a lock whose process is
    gone (same host) is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder.parent / f".{folder.name}.lock"
        self.held = False

    def acquire(self) -> str | None:
        """`None` when acquired, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": qrun._now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # its process is gone: a stale lock
                    continue
                return f"pid {other.get('pid')} on {other.get('host')} since {other.get('since')}"
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return None
        return "a lock that keeps coming back"

    def holder(self) -> str | None:
        """Who holds the lock when a live process does (a lock of a gone process on this host counts as free)."""
        try:
            other = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if other.get("host") == socket.gethostname() and not _alive(int(other.get("pid", -1))):
            return None
        return f"pid {other.get('pid')} on {other.get('host')}"

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
