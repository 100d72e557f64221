"""The client side of a federated round: tokenize once, train with TRL's SFTTrainer, evaluate perplexity.

One function per step, shared by the in-process simulation and (later) the Flower ClientApp, so each algorithm's
client update exists in one place. Every method uses the same `PerFITModel` machinery: FedIT/FedProx/local are a
PerFIT adapter with `expansion_factor=1` and PEFT's standard init, i.e. exactly a vanilla rank-r LoRA (nothing is
pruned, so the mask code is skipped).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import tempfile
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from .._compose import compose
from ..callbacks import PerFITPruningCallback, release_mixed_precision
from ..model import PerFITModel
from .comm import downlink_bytes, uplink_bytes
from .compact_head import enable_compact_head_on_cpu
from .config import FederatedConfig
from .messages import OWN_B, PERSONAL, SELECT_B, SELECTED_PARTS, ClientInstruction, ClientUpdate, personal_keys

# Training's loss projects the response positions only, on CPU as on CUDA (compact_head.py): enabled when the client
# code is imported, so every trainer of the process, built before or after, computes the same sums the same way.
enable_compact_head_on_cpu()

# The TrainingArguments name of activation checkpointing in the installed transformers (renamed in 5.24).
_CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
    else "gradient_checkpointing"
)

IGNORE_INDEX = -100


@compose(
    {
        **{
            name: (FederatedConfig, name)
            for name in (
                "local_steps",
                "learning_rate",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
            )
        },
        "weight_decay": (SFTConfig, "weight_decay"),
        "max_grad_norm": (SFTConfig, "max_grad_norm"),
        **{
            name: (FederatedConfig, name)
            for name in ("max_length", "eval_batch_size", "seed", "gradient_checkpointing", "lr_decay_per_round")
        },
    }
)
class LocalTrainingArgs:
    """What a client's local update needs to know (the same for every client of a run): `FederatedConfig`'s fields
    of the same names (their types and defaults, declared once), SFTConfig's `weight_decay` and `max_grad_norm`, and
    `bf16` resolved to a bool or `None`."""

    bf16: bool | None = False
    """bf16 autocast (mixed precision; the adapter stays fp32) in training; `None`: on when the model is on a CUDA
    device that supports bf16 (`bf16: auto`). fp32 is the reference."""


def round_learning_rate(args: LocalTrainingArgs, round_idx: int) -> float:
    """The learning rate of federated round `round_idx` (0-based): `learning_rate · lr_decay_per_round ** round_idx`
    (FedAMoLE's authors: 5e-5 · 0.99^t; docs/federated.md)."""
    return args.learning_rate * args.lr_decay_per_round ** max(int(round_idx), 0)


def tokenize_for_completion_loss(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Tokenize `prompt`/`completion` rows (conversational or text) into `input_ids` and `labels`, the prompt's
    labels set to -100 (completion-only loss). Used for training and evaluation alike."""

    def one(example: dict[str, Any]) -> dict[str, list[int]]:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list):  # conversational: the tokenizer's chat template
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
            if hasattr(prompt_ids, "keys"):  # transformers 5 returns a BatchEncoding (a UserDict) by default
                prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
        else:
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            full_ids = tokenizer(prompt + completion + (tokenizer.eos_token or ""), add_special_tokens=True)[
                "input_ids"
            ]
        n = 0  # where prompt and prompt+completion diverge (the template may render the prompt differently)
        while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
            n += 1
        full_ids = list(full_ids)[:max_length]
        labels = [IGNORE_INDEX] * min(n, len(full_ids)) + full_ids[n:]
        return {"input_ids": full_ids, "labels": labels}

    out = ds.map(one, remove_columns=ds.column_names, desc="Tokenizing")
    return out.filter(lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]), desc="Dropping empty completions")


class _ProximalSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss adds FedProx's `(mu/2)·‖θ − θ_global‖²` over the trainable LoRA tensors."""

    def __init__(self, *args: Any, model: PerFITModel, proximal_mu: float, **kwargs: Any) -> None:
        super().__init__(*args, model=model, **kwargs)
        self.set_anchor(proximal_mu)

    def set_anchor(self, proximal_mu: float) -> None:
        """Take the adapter the model holds now as θ_global (what the server sent) and set `mu`; called at the
        start of every client round."""
        self.proximal_mu = proximal_mu
        self._params = self.model.lora_parameters()
        self._anchor = {k: p.detach().clone() for k, p in self._params.items()}

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, rest = (out[0], out[1:]) if return_outputs else (out, None)
        params = self._params
        prox = sum(((params[k] - a.to(params[k].device)) ** 2).sum() for k, a in self._anchor.items())
        loss = loss + 0.5 * self.proximal_mu * prox
        return (loss, *rest) if return_outputs else loss


class _AuxLossSFTTrainer(SFTTrainer):
    """SFTTrainer that adds the model's auxiliary loss (`model.auxiliary_loss()`, e.g. MoLE's load-balancing loss).

    TRL's SFTTrainer computes the LM loss itself from per-token log-probabilities and never reads `outputs.loss`, so
    a loss term the model computes in its forward has to be added here."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        aux = self.model.auxiliary_loss()
        if aux is None:
            return out
        # as TRL does for its own MoE aux loss: with num_items_in_batch the Trainer leaves gradient accumulation to
        # the loss, and the aux loss is a per-micro-batch mean
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        if return_outputs:
            return (out[0] + aux / steps, *out[1:])
        return out + aux / steps


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA device of compute capability 8.0+ (Ampere and newer)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _sft_config(
    args: LocalTrainingArgs, output_dir: str, seed: int, processes: int, device: torch.device
) -> SFTConfig:
    """The `SFTConfig` of one client round on `device` (the same for every round of a run except `seed`/`data_seed`)."""
    return SFTConfig(
        output_dir=output_dir,
        max_steps=args.local_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=args.max_length,
        # fp32 is the reference (TRL defaults to bf16); `bf16=True` is autocast mixed precision (the adapter stays
        # fp32), turned on by `bf16: auto` on GPUs that support it.
        bf16=bf16_supported(device) if args.bf16 is None else args.bf16,
        # TRL defaults to activation checkpointing: a second forward per step (~30% more compute) to save
        # activation memory that a 135M model on 2 cores does not need. Opt in for big models.
        # (transformers >= 5.24 calls it `activation_checkpointing`; its old name is an alias that warns at every
        # client round because TRL's default for the old name is set)
        **{_CHECKPOINTING_ARG: args.gradient_checkpointing},
        # train where the model is: `load_model` places it (`device: auto|cpu|cuda`), the Trainer never moves it
        use_cpu=device.type == "cpu",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        # The client data is tokenized and truncated once per run (`tokenize_for_completion_loss`): TRL's own
        # preparation (a truncation map and an empty-label filter, ~0.1 s per client round) would change nothing.
        dataset_kwargs={"skip_prepare_dataset": True},
        # With N processes each batch is split N ways (data-parallel), so the optimizer sees the same examples
        # per step as a one-process run and the results agree within floating-point tolerance.
        accelerator_config={"split_batches": processes > 1},
    )


def _is_prepared(ds: datasets.Dataset, max_length: int) -> bool:
    """Whether `ds` is what TRL's dataset preparation would leave unchanged: `input_ids` and `labels`, no row longer
    than `max_length`, no row without a completion token."""
    if not {"input_ids", "labels"} <= set(ds.column_names):
        return False
    labels = ds["labels"]
    return all(len(x) <= max_length for x in ds["input_ids"]) and all(
        any(t != IGNORE_INDEX for t in y) for y in labels
    )


class _LocalTrainer:
    """One TRL `SFTTrainer` reused for every client round of a run on one model.

    Building an `SFTTrainer` (its `SFTConfig`, accelerator, fused LM head, callbacks) cost ~1 s per client round on 2
    CPU cores, far more than the few local steps it then runs. Every round here only swaps what a freshly built trainer
    would see differently: the training set, `seed`/`data_seed` (global RNGs seeded by `set_seed` exactly as the
    Trainer's constructor does, the data order from the accelerator's seedable sampler), and a new optimizer,
    scheduler, `TrainerState` and control. `tests/test_local_trainer.py` checks that losses and adapters equal those
    of a fresh `SFTTrainer` per round for every strategy.
    """

    def __init__(self, model: PerFITModel, tokenizer: Any, args: LocalTrainingArgs, kind: str, processes: int):
        self._tmp = tempfile.TemporaryDirectory(prefix="hf_perfit_trainer_")  # nothing is written (save: no)
        self.processes = processes
        self.args = args
        self._prepared: dict[str, datasets.Dataset | None] = {}  # by fingerprint; None: used as is
        sft_args = _sft_config(args, self._tmp.name, args.seed, processes, _model_device(model))
        # the constructor needs a training set; a one-row placeholder is swapped for the client's set every round
        placeholder = datasets.Dataset.from_dict({"input_ids": [[0]], "labels": [[0]]})
        common = dict(
            model=model,
            args=sft_args,
            train_dataset=placeholder,
            processing_class=tokenizer,
            callbacks=[PerFITPruningCallback()] if isinstance(model, PerFITModel) else [],
        )
        if kind == "proximal":
            self.trainer: SFTTrainer = _ProximalSFTTrainer(**common, proximal_mu=0.0)
        elif kind == "aux":
            self.trainer = _AuxLossSFTTrainer(**common)
        else:
            self.trainer = SFTTrainer(**common)
        # The coordinator shows one progress bar over rounds and clients; the Trainer's per-step log lines would
        # drown it (the losses still reach `log_history`).
        self.trainer.remove_callback(PrinterCallback)
        self.trainer.remove_callback(ProgressCallback)
        _keep_device_cache(self.trainer.accelerator)

    def _dataset(self, ds: datasets.Dataset) -> datasets.Dataset:
        """`ds` as TRL would prepare it: itself when already tokenized and truncated (checked once per dataset), else
        through TRL's own preparation (raw prompt/completion rows, rows longer than `max_length`)."""
        key = ds._fingerprint
        if key not in self._prepared:
            if _is_prepared(ds, self.args.max_length):
                self._prepared[key] = None
            else:
                t = self.trainer
                t.completion_only_loss = {"prompt", "completion"} <= set(ds.column_names)  # as TRL decides it
                self._prepared[key] = t._prepare_dataset(ds, t.processing_class, t.args, False, None, "train")
        prepared = self._prepared[key]
        return ds if prepared is None else prepared

    def train(self, train_ds: datasets.Dataset, seed: int, proximal_mu: float) -> list[float]:
        """One client round from the adapter the model holds: `args.local_steps` optimizer steps; returns the
        logged per-step losses."""
        from transformers import TrainerControl
        from transformers.trainer_utils import set_seed

        t = self.trainer
        t.train_dataset = self._dataset(train_ds)
        t.args.seed = t.args.data_seed = seed
        t.accelerator.dataloader_config.data_seed = seed  # the seedable sampler's seed, read when preparing
        t.optimizer, t.lr_scheduler = None, None  # a fresh AdamW (empty moments) and scheduler every round
        t.control = TrainerControl()
        t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        t._total_train_tokens = 0
        if isinstance(t, _ProximalSFTTrainer):
            t.set_anchor(proximal_mu)
        set_seed(seed)  # what `SFTTrainer.__init__` and `Trainer.__init__` do before anything random
        result = t.train()
        release_mixed_precision(t.model)  # any adapter (PerFIT's callback does it too; MoLE has no callback)
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        return losses or [float(result.training_loss)]


def _keep_device_cache(accelerator: Any) -> None:
    """Make `accelerator.free_memory()`, which `Trainer.train` calls at its start, drop the previous round's
    references only. accelerate's version also runs `gc.collect()` (0.1-1.7 s per call in a process that holds torch,
    transformers and TRL, the larger figure on a loaded 2-core machine) and `torch.cuda.empty_cache()` (the next
    round then allocates its memory from CUDA again); neither changes a number, both are a fixed cost per round."""
    if getattr(accelerator, "deepspeed_engine_wrapped", None) is not None:
        return  # DeepSpeed's engine needs accelerate's own teardown

    def free_memory(*objects: Any) -> list[None]:
        for name in ("_schedulers", "_optimizers", "_models", "_dataloaders"):
            setattr(accelerator, name, [])
        accelerator.step = 0
        return [None] * len(objects)

    accelerator.free_memory = free_memory


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


_TRAINERS_ATTR = "_hf_perfit_local_trainers"


def _local_trainer(model: PerFITModel, tokenizer: Any, args: LocalTrainingArgs, kind: str, processes: int):
    """The model's cached [`_LocalTrainer`] for these settings (built on first use). The cache lives on the model, so
    it goes away with it; every setting but the seed is part of the key."""
    cache = model.__dict__.setdefault(_TRAINERS_ATTR, {})
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k != "seed"}
    key = (kind, id(tokenizer), processes, str(_model_device(model)), tuple(sorted(settings.items())))
    if key not in cache:
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            cache[key] = _LocalTrainer(model, tokenizer, args, kind, processes)
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
    return cache[key]


def train_client(
    model: PerFITModel,
    tokenizer: Any,
    train_ds: datasets.Dataset,
    args: LocalTrainingArgs,
    proximal_mu: float = 0.0,
    seed: int | None = None,
) -> dict[str, float]:
    """Run `args.local_steps` optimizer steps of completion-only SFT on a tokenized dataset, from whatever adapter
    state `model` holds. PerFIT's search runs inside through [`PerFITPruningCallback`]. FedProx's proximal term pulls
    toward the adapter the client started from (the global model it received).

    One TRL `SFTTrainer` per model and settings is built on the first call and reused by the later ones (a new
    optimizer, scheduler, seed and training set each call): the results equal those of a fresh trainer per call.
    Training runs on the model's device; `args.bf16` turns on bf16 autocast.

    Returns:
        `dict` with `train_loss` (mean over the round's logged steps) and `steps`.
    """
    if len(train_ds) == 0:
        raise ValueError("this client has no training examples after tokenization; check its data and max_length.")
    from ..distributed import process_state

    processes = process_state().num_processes
    if args.per_device_train_batch_size % processes:
        raise ValueError(
            f"per_device_train_batch_size={args.per_device_train_batch_size} is not divisible by the "
            f"{processes} processes: under accelerate each client batch is split across the processes; choose a "
            "multiple of the process count."
        )
    if proximal_mu > 0:
        kind = "proximal"
    elif hasattr(model, "auxiliary_loss"):  # FedAMoLE's MoLEModel: its balance loss
        kind = "aux"
    else:
        kind = "plain"
    local = _local_trainer(model, tokenizer, args, kind, processes)
    model.train()
    try:
        losses = local.train(train_ds, args.seed if seed is None else seed, proximal_mu)
    finally:
        model.eval()
    return {"train_loss": float(sum(losses) / len(losses)), "steps": args.local_steps}


AdapterState = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]
"""A client's persistent state between rounds: (adapter tensors, keep-masks or None, search progress/meta)."""


@dataclass
class ClientRoundResult:
    """What one client round produces: the upload, the state to keep locally, and bookkeeping for metrics."""

    update: ClientUpdate
    state: AdapterState
    bytes_up: int
    bytes_down: int
    train_loss: float
    density: float


def client_update(
    model: PerFITModel,
    tokenizer: Any,
    train_ds: datasets.Dataset,
    instruction: ClientInstruction,
    state: AdapterState | None,
    args: LocalTrainingArgs,
    *,
    client_id: str,
    initial_tensors: dict[str, torch.Tensor],
    uses_masks: bool,
    budget_multiplier: float = 1.0,
    seed: int | None = None,
    round_idx: int = 0,
) -> ClientRoundResult:
    """One client's whole federated round, the single implementation shared by the in-process simulation and the
    Flower `ClientApp`: load the client's state into the shared model, apply the server's instruction, train with
    [`train_client`], and build the upload.

    Args:
        model: the shared `PerFITModel` (its adapter is overwritten).
        tokenizer: the tokenizer.
        train_ds: the client's tokenized training set (see [`tokenize_for_completion_loss`]).
        instruction: what the server sent. `tensors=None` keeps the client's own adapter (`local`);
            `config["research"]` restarts PerFIT's architecture search; `config["proximal_mu"]` turns on FedProx;
            `config["personal"]` (e.g. `["lora_B"]`, PerFIT's `personal_b`) keeps those matrices from the client's own
            state (the tensors hold the other keys only), and the upload leaves them out; `config["select_b"] = n`
            (PerFIT's `select_b_rows`) holds `n` training rows out ([`selection_split`]) and starts from the LoRA B,
            the server's or the client's own, with the lower loss on them ([`select_b`]).
        state: the client's state from its last round, or `None` in its first round.
        args: local training settings.
        client_id: the client's id (goes into the upload).
        initial_tensors: the adapter a client starts from when it has no state and the server sent no tensors.
        uses_masks: whether the strategy aggregates over PerFIT masks (`Strategy.uses_masks`): then the mask is
            uploaded once the search has finished, and only when it changed.
        budget_multiplier: PerFIT's per-client budget multiplier `b_k`.
        seed: the seed of this client round (data order, dropout).
        round_idx: the federated round (0-based); sets the round's learning rate ([`round_learning_rate`]).

    Returns:
        [`ClientRoundResult`].
    """
    tensors, masks, meta = state if state is not None else (initial_tensors, None, {"mask_uploaded": False})
    meta = {**meta, "budget_multiplier": float(budget_multiplier)}
    if instruction.config.get("research"):
        masks, meta = None, {**meta, "search_step": 0, "prune_iterations_done": 0, "mask_uploaded": False}
    personal = _personal_parts(instruction)
    rows = _select_rows(instruction)
    held = None
    if rows:  # every round, so that the held-out rows are never trained on
        train_ds, held = selection_split(train_ds, rows, client_id)
    if instruction.config.get("seeded_init") and state is None:
        tensors = initial_tensors  # the run's seeded init, rebuilt here: the server sends nothing (docs/perfit.md)
    elif instruction.tensors is not None and personal:
        tensors = _with_own(tensors, instruction.tensors, personal)
    elif instruction.tensors is not None:
        tensors = instruction.tensors
    selection: dict[str, float] = {}
    if held is not None and state is not None and instruction.tensors is not None and not personal:
        if not instruction.config.get("research"):  # a re-search starts from θ_g dense: nothing to choose
            tensors, selection = select_b(model, tokenizer, held, tensors, state[0], masks, meta, args.eval_batch_size)
    model.set_adapter_state(tensors, masks, meta)
    mu = float(instruction.config.get("proximal_mu", 0.0))
    if args.lr_decay_per_round != 1.0:
        args = dataclasses.replace(args, learning_rate=round_learning_rate(args, round_idx))
    metrics = train_client(model, tokenizer, train_ds, args, mu, seed=seed)
    new_tensors, new_masks, new_meta = model.get_adapter_state()
    searched = uses_masks and not model.is_searching
    mask_changed = searched and not meta.get("mask_uploaded", False)
    new_meta["mask_uploaded"] = bool(meta.get("mask_uploaded", False) or mask_changed)
    sent_tensors, sent_masks = new_tensors, new_masks if searched else None
    if personal:  # the personal matrices stay here: neither their values nor their masks are uploaded
        mine = set(personal_keys(new_tensors, personal))
        sent_tensors = {k: t for k, t in new_tensors.items() if k not in mine}
        if sent_masks is not None:
            sent_masks = {k: m for k, m in sent_masks.items() if k not in mine}
    update = ClientUpdate(
        client_id=client_id,
        num_examples=len(train_ds),
        tensors=sent_tensors,
        masks=sent_masks,
        mask_changed=mask_changed,
        metrics={**{k: float(v) for k, v in metrics.items()}, **selection},
        # FedAMoLE: the routing statistics the server assigns experts with
        extra_tensors=model.client_extras() if hasattr(model, "client_extras") else {},
    )
    return ClientRoundResult(
        update=update,
        state=(new_tensors, new_masks, new_meta),
        bytes_up=uplink_bytes(update),
        bytes_down=downlink_bytes(instruction),
        train_loss=float(metrics["train_loss"]),
        density=model.density(),
    )


def _select_rows(instruction: ClientInstruction) -> int:
    """`instruction.config["select_b"]` (0 when absent), checked."""
    rows = instruction.config.get(SELECT_B) or 0
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"instruction config {SELECT_B}={rows!r} must be an integer >= 0 (held-out training rows).")
    return rows


def selection_split(
    train_ds: datasets.Dataset, rows: int, client_id: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """`(training rows, held-out rows)` of a `select_b` client: `rows` rows drawn by a generator seeded with the
    client id alone, so the same rows are held out in every round and every run (whatever the run's seed), and the
    rest, in their order, are trained on.

    Raises:
        ValueError: `rows` leaves no row to train on.
    """
    if rows >= len(train_ds):
        raise ValueError(
            f"client {client_id!r} has {len(train_ds)} training rows; select_b_rows={rows} holds out as many or more "
            "and leaves none to train on: lower select_b_rows (docs/perfit.md, perfit_bsel) or give it more data."
        )
    held = set(random.Random(f"{SELECT_B}/{client_id}").sample(range(len(train_ds)), rows))
    keep = [i for i in range(len(train_ds)) if i not in held]
    return train_ds.select(keep), train_ds.select(sorted(held))


def select_b(
    model: PerFITModel,
    tokenizer: Any,
    held: datasets.Dataset,
    sent: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    meta: dict[str, Any],
    batch_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The round's start of a `select_b` client: `sent` (the server's adapter, `θ_g ⊙ m_k`) or `sent` with the
    LoRA B tensors replaced by the client's `own` (its state after its last round), whichever has the lower
    response-token loss on the held-out rows `held`; a tie keeps the server's (docs/perfit.md, `perfit_bsel`).

    Returns:
        `(tensors, selection)`: the chosen adapter and `{"own_b": 1.0 or 0.0, "select_loss_server": ...,
        "select_loss_own": ...}`.
    """
    mine = personal_keys(sent, SELECTED_PARTS)
    if not mine or any(k not in own for k in mine):
        raise ValueError(
            f"select_b needs the client's own {SELECTED_PARTS} tensors, but its state lacks "
            f"{[k for k in mine if k not in own][:3] or SELECTED_PARTS}; set select_b_rows: 0."
        )
    mixed = {**sent, **{k: own[k] for k in mine}}
    losses = []
    for candidate in (sent, mixed):
        model.set_adapter_state(candidate, masks, meta)
        losses.append(evaluate_perplexity(model, tokenizer, held, batch_size)["eval_loss"])
    use_own = losses[1] < losses[0]
    selection = {OWN_B: float(use_own), "select_loss_server": losses[0], "select_loss_own": losses[1]}
    return (mixed if use_own else sent), selection


def _personal_parts(instruction: ClientInstruction) -> list[str]:
    """The matrix names of `instruction.config["personal"]` (empty when absent), checked."""
    parts = instruction.config.get(PERSONAL) or []
    if isinstance(parts, str) or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(
            f"instruction config {PERSONAL}={parts!r} must be a list of adapter matrix names, e.g. ['lora_B']."
        )
    return list(parts)


def _with_own(
    own: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], parts: list[str]
) -> dict[str, torch.Tensor]:
    """The adapter a client with personal matrices `parts` starts from: its own values of those keys (its last
    state, or the seeded init before its first round), the server's `sent` values of every other key."""
    mine = set(personal_keys(own, parts))
    if not mine:
        raise ValueError(f"the server asked to keep {parts} personal, but the adapter has no such tensors.")
    expected = set(own) - set(mine)
    if set(sent) != expected:
        missing, extra = sorted(expected - set(sent)), sorted(set(sent) - expected)
        raise ValueError(
            f"the server's tensors do not fit an adapter whose {parts} stay personal: missing {missing[:3]}, "
            f"unexpected {extra[:3]} (the server must send every other tensor and none of the personal ones)."
        )
    return {k: (own[k] if k in mine else sent[k]) for k in own}


_EVAL_BATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Padded evaluation batches per test set (freed with the dataset), keyed further by batch size, pad id, device."""


def _eval_batches(
    test_ds: datasets.Dataset, batch_size: int, pad: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]]:
    """`(input_ids, attention_mask, shifted labels, scored tokens, scored positions)` of every batch of `test_ds`,
    built once and kept on `device`. The scored positions are the columns of the shifted labels where any row of the
    batch has a response token: the only positions whose logits the loss reads.

    Batches of similar length: every row is padded to its batch's longest and the forward's cost grows with the padded
    width (the demo's test splits, 16 rows per client in batches of 8: 11,143 padded tokens instead of 12,101)."""
    per_ds = _EVAL_BATCHES.setdefault(test_ds, {})
    key = (batch_size, pad, str(device))
    if key not in per_ds:
        columns = test_ds.select_columns(["input_ids", "labels"])[:]  # one columnar read instead of one per row
        all_ids, all_labels = columns["input_ids"], columns["labels"]
        order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
        batches = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(all_ids[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE_INDEX)
            attn = torch.zeros_like(ids)
            for j, i in enumerate(rows):
                x, y = all_ids[i], all_labels[i]
                ids[j, : len(x)], labels[j, : len(y)], attn[j, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            shifted = labels[:, 1:].contiguous()
            is_scored = shifted != IGNORE_INDEX
            scored = int(is_scored.sum())
            positions = is_scored.any(dim=0).nonzero().flatten()
            batches.append((ids.to(device), attn.to(device), shifted.to(device), scored, positions.to(device)))
        per_ds[key] = batches
    return per_ds[key]


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under `model` (PEFT wrappers unwrapped) takes `logits_to_keep` as an index tensor (the
    `transformers` causal LMs that slice their hidden states before the head); others get the full logits."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module, tokenizer: Any, test_ds: datasets.Dataset, batch_size: int = 8
) -> dict:
    """Personalized perplexity: `exp` of the mean response-token loss (token-weighted over the whole split; prompt
    tokens excluded) on a tokenized test split. Runs on the model's device; the padded batches of a test set are
    built on the first call and reused by later ones (every round evaluates the same split).

    Returns:
        `dict` with `eval_loss`, `perplexity` and `eval_tokens`.
    """
    if len(test_ds) == 0:
        raise ValueError("this client has an empty test split; give it at least one test example.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    keep = _accepts_logits_to_keep(model)
    for ids, attn, shift_labels, scored, positions in _eval_batches(test_ds, batch_size, pad, device):
        if keep:
            # The logits of the scored positions only: the LM head and the softmax over the vocabulary (49,152 on
            # SmolLM2) are a large part of a forward, and most positions are prompt. The same sum as over the full
            # logits (the head maps each position on its own; only the rounding of a smaller matmul may differ);
            # measured on SmolLM2-135M, FLAN-8 clients 4 and 5, 50 test rows in batches of 8, one CPU thread:
            # 19-26 s instead of 25-34 s, the eval loss equal to 3e-8 relative.
            shift_logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=positions).logits.float()
            shift_labels = shift_labels[:, positions]
        else:
            shift_logits = model(input_ids=ids, attention_mask=attn).logits.float()[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total_nll += nll.double()  # summed on the device: one host sync per evaluation, not per batch
        total_tokens += scored
    if was_training:
        model.train()
    loss = float(total_nll) / max(total_tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": total_tokens}
