"""Generation-based evaluation: greedy answers of a (personalized) model and their ROUGE-L against the references.

Perplexity (`hf_perfit.federated.evaluate_perplexity`) scores the reference answer token by token; this module scores
what the model actually says. ROUGE-L comes from Google's `rouge-score` package (`rouge_score.rouge_scorer`, offline),
with the Unicode-aware tokenizer below instead of its ASCII-only default (which splits `"Köln"` into `k`, `ln`).
`evaluate.load("rouge")` is not used: it fetches its metric script from the Hub, which this project never does at run
time.

```python
from hf_perfit.evaluation import generate_answers, rouge_l

answers = generate_answers(model, tokenizer, client.test.select(range(50)))
score = sum(rouge_l(a, r) for a, r in zip(answers, client.test["response"][:50])) / 50
```
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["generate_answers", "rouge_l", "rouge_tokens"]

_NOT_WORD = re.compile(r"[^\w\s]|_")


def rouge_tokens(text: str) -> list[str]:
    """The word tokens ROUGE-L compares: the text lowercased, every character that is neither a letter, a digit nor
    whitespace (punctuation, symbols and `_`) replaced by a space, then split on whitespace. Letters and digits are
    Unicode-aware (`"Köln"` -> `["köln"]`); no stemming, no stop words.

    Example:
        ```python
        >>> rouge_tokens("Don't stop: 3.5 km!")
        ['don', 't', 'stop', '3', '5', 'km']
        ```
    """
    return _NOT_WORD.sub(" ", text.lower()).split()


class _Tokenizer:
    """[`rouge_tokens`] in the interface `rouge_score.rouge_scorer.RougeScorer(tokenizer=...)` takes."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


@functools.cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin, 2004) of one prediction against one reference, by `rouge-score`.

    With `L` the length of the longest common subsequence of the two token lists (see [`rouge_tokens`]),
    precision `P = L / len(prediction)`, recall `R = L / len(reference)` and `F = 2PR / (P + R)` (β = 1,
    `rouge_score`'s `fmeasure`).

    Args:
        prediction (`str`): the model's answer.
        reference (`str`): the reference answer.

    Returns:
        `float` in [0, 1]; `0.0` when either side has no tokens, or nothing in common.

    Example:
        ```python
        >>> rouge_l("The cat sat on the mat.", "the cat is on the mat")  # LCS "the cat on the mat": 5 of 6 each
        0.8333333333333334
        ```
    """
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def _prompt_ids(example: Mapping[str, Any], tokenizer: Any, system_prompt: str | None) -> list[int]:
    """The token ids of an example's prompt exactly as training sees them (`format_for_tokenizer` +
    `tokenize_for_completion_loss`): the chat template with the generation prompt when the tokenizer has one, the
    Alpaca-style text prompt with the tokenizer's special tokens otherwise."""
    from .data import to_conversational, to_prompt_completion_text

    if getattr(tokenizer, "chat_template", None):
        prompt = to_conversational(example, system_prompt)["prompt"]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding by default
            ids = ids["input_ids"]
        return list(ids)
    prompt = to_prompt_completion_text(example, system_prompt)["prompt"]
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in config_eos if isinstance(config_eos, list | tuple) else [config_eos]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Any,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers of `model` to instruction examples, prompted exactly as in training.

    Each example becomes the prompt `hf_perfit.data.format_for_tokenizer` trains on (conversational through the
    tokenizer's chat template, with the generation prompt, when it has one; the plain-text Alpaca layout otherwise).
    Prompts are batched with left padding; decoding is greedy (`do_sample=False`, one beam) and stops at the
    tokenizer's or the model's end-of-sequence token or after `max_new_tokens`. Only the new tokens are decoded,
    special tokens skipped, and the result stripped. Batches are formed from prompts of similar length (less
    padding); the answers come back in the order of `examples`.

    Args:
        model (`torch.nn.Module`): a causal LM (a `PeftModel` with a client's adapter, or a plain base model).
        tokenizer: its tokenizer.
        examples: a `datasets.Dataset` or a sequence of mappings with the canonical columns `instruction` and
            optionally `context` (`response` is not used).
        max_new_tokens (`int`, *optional*, defaults to 32): most tokens generated per answer.
        batch_size (`int`, *optional*, defaults to 8): prompts per `generate` call.
        system_prompt (`str`, *optional*): the system message / first paragraph, if training used one.

    Returns:
        `list[str]`: one answer per example.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1.")
    from transformers import GenerationConfig

    rows = [examples[i] for i in range(len(examples))]
    prompts = [_prompt_ids(row, tokenizer, system_prompt) for row in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else int(pad)
    eos = _eos_ids(model, tokenizer)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(rows)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
                attn[row, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen_config
            )
            for row, i in enumerate(chunk):
                answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    finally:
        if was_training:
            model.train()
    return answers
