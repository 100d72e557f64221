"""ROUGE-L on hand-computed cases, and greedy generation on the tiny random Llama (no download, a few seconds)."""

from __future__ import annotations

import datasets
import pytest
import torch

from hf_perfit.data import format_for_tokenizer
from hf_perfit.evaluation import _prompt_ids, generate_answers, rouge_l, rouge_tokens
from hf_perfit.federated.client import tokenize_for_completion_loss

from .conftest import build_tokenizer, tiny_llama


def test_rouge_tokens_lowercase_and_split_punctuation():
    assert rouge_tokens("Don't stop: 3.5 km!") == ["don", "t", "stop", "3", "5", "km"]
    assert rouge_tokens("  Köln_Bonn\tA-B  ") == ["köln", "bonn", "a", "b"]
    assert rouge_tokens("?!...") == []


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("yes", "yes", 1.0),
        ("Yes!", "yes", 1.0),  # case and punctuation do not count
        ("no", "yes", 0.0),
        # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = 5/6
        ("The cat sat on the mat.", "the cat is on the mat", 5 / 6),
        # Lin (2004): LCS 3 ("police the gunman") of 4 and 4
        ("police kill the gunman", "police killed the gunman", 0.75),
        # LCS 2 ("the gunman"): order matters, unlike bag-of-words overlap
        ("the gunman kill police", "police killed the gunman", 0.5),
        # LCS 2 of 4 predicted, 2 reference tokens: P = 1/2, R = 1, F = 2·(1/2)·1 / (3/2) = 2/3
        ("a b c d", "a c", 2 / 3),
        # LCS 1 ("b") of 1 and 3: P = 1, R = 1/3, F = 2·(1/3) / (4/3) = 1/2
        ("b", "a b c", 0.5),
        ("", "yes", 0.0),
        ("yes", "", 0.0),
        ("!!", "!!", 0.0),  # no tokens on either side
    ],
)
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


# rouge_l's values before it moved onto `rouge-score` (the hand-written LCS it replaced), on sentences with
# punctuation, Unicode letters, `_`, repeated tokens and reordering: the move changes no number
@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Paris is the capital of France.", "The capital of France is Paris.", 0.6666666666666666),
        ("Köln liegt am Rhein; Bonn auch.", "Bonn und Köln liegen am Rhein.", 0.5),
        (
            "1. Preheat the oven to 180°C. 2. Mix flour_and sugar.",
            "Preheat oven to 180 C, then mix the flour and sugar.",
            0.7826086956521738,
        ),
        ("a a a b", "a b a b a", 0.6666666666666665),
        ("Don't stop: 3.5 km!", "do not stop at 3.5 km", 0.6153846153846153),
    ],
)
def test_rouge_l_matches_the_previous_implementation(prediction, reference, expected):
    assert rouge_l(prediction, reference) == expected


def test_rouge_l_is_symmetric_in_f_measure():
    a, b = "entailment is the answer here", "the answer is not_entailment"
    assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))


def _examples(n: int) -> list[dict]:
    return [{"instruction": f"Echo {i}" + "!" * (i % 3), "context": "", "response": str(i)} for i in range(n)]


def test_prompt_matches_training_tokenization():
    tok = build_tokenizer()
    example = {"instruction": "Echo 3", "context": "ctx", "response": "3"}
    formatted = format_for_tokenizer(datasets.Dataset.from_list([example]), tok)  # what training tokenizes
    tokenized = tokenize_for_completion_loss(formatted, tok, max_length=256)[0]
    prompt = _prompt_ids(example, tok, None)
    n_prompt = sum(1 for y in tokenized["labels"] if y == -100)
    assert prompt == tokenized["input_ids"][:n_prompt]  # the answer starts where training's completion starts


def test_generate_answers_one_string_per_example_and_deterministic():
    tok, model = build_tokenizer(), tiny_llama()
    examples = _examples(5)
    first = generate_answers(model, tok, examples, max_new_tokens=6, batch_size=2)
    again = generate_answers(model, tok, datasets.Dataset.from_list(examples), max_new_tokens=6, batch_size=2)
    single = generate_answers(model, tok, examples[:2], max_new_tokens=6, batch_size=1)
    assert len(first) == 5 and all(isinstance(a, str) for a in first)
    assert first == again  # greedy: same answers, list or Dataset input
    assert single == first[:2]  # left padding does not change an answer
    assert all(len(tok(a, add_special_tokens=False)["input_ids"]) <= 6 for a in first)
    assert not model.training


def test_generate_answers_decodes_only_new_tokens():
    tok, model = build_tokenizer(), tiny_llama()

    class Echo(torch.nn.Module):  # "generates" a fixed answer after the prompt, then end-of-sequence
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = model.generation_config

        def generate(self, input_ids, attention_mask, generation_config):
            answer = torch.tensor(tok(" ok ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            return torch.cat([input_ids, answer.expand(len(input_ids), -1)], dim=1)

    assert generate_answers(Echo(), tok, _examples(3), batch_size=2) == ["ok", "ok", "ok"]


def test_generate_answers_refuses_bad_sizes():
    with pytest.raises(ValueError, match="must be >= 1"):
        generate_answers(tiny_llama(), build_tokenizer(), _examples(1), max_new_tokens=0)
