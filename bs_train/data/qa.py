"""TOFU-format question/answer data: loading, checking and tokenisation.

Unlearning trains on two sets of question/answer pairs, a forget set and a retain set, in the format of TOFU
(``locuslab/TOFU``: one JSON object per row with ``question`` and ``answer``, and in the ``*_perturbed`` splits
``paraphrased_answer``, ``perturbed_answer`` (a list), ``paraphrased_question``). This module:

* ``load_qa`` reads a split from a local folder of ``{split}.jsonl`` files or from a Hub dataset id, and checks every
  row at the boundary, so a malformed file fails with its name and line instead of deep inside training;
* ``resolve_data`` / ``load_split`` find the data an evaluation reads (a run folder's own data, ``"synthetic"``, a
  folder, a Hub id or an in-memory ``{split: rows}`` mapping) and its optional splits; ``check_perturbed`` and
  ``wrong_answers`` check and read the wrong answers of the ``_perturbed`` / real-authors / world-facts rows;
* ``encode_qa`` tokenises one pair as prompt + answer + EOS with labels on the answer tokens and EOS only (the
  prompt is the tokenizer's chat template when it has one); labels are unshifted, Hugging Face style. With
  ``protocol="open-unlearning"`` it builds open-unlearning's inputs instead (``src/data/utils.py``
  ``preprocess_chat_instance``): its template arguments per chat family (``OU_TEMPLATE_ARGS``), the whole chat
  tokenised at once and labels on everything after the prompt (for ChatML: answer + ``<|im_end|>\\n<|im_end|>``);
  ``collate(..., mask_pad_tokens=True)`` then gives its attention mask ``input_ids != pad`` (with pad == eos every
  EOS in the text is masked: open-unlearning issue #128);
* ``QADataset`` holds a split tokenised once; ``batching.py`` turns its rows into batches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bs_kernels import IGNORE_INDEX

from .rows import load_rows

_OPTIONAL_STR_FIELDS = ("paraphrased_answer", "paraphrased_question", "option1", "option2", "option3", "option4")


# ----------------------------------------------------------------------------------------------------- loading


def load_qa(source: str | os.PathLike[str], split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` from ``source``: a local folder holding ``{split}.jsonl``, or else a Hub dataset id
    (e.g. ``"locuslab/TOFU"``, loaded with ``datasets.load_dataset(source, split, split="train")``); a
    ``subset/split`` name reads ``{subset}/{split}.jsonl`` or that Hub config and split (MUSE's ``knowmem/forget_qa``).

    Every row must have non-empty string ``question`` and ``answer``; ``perturbed_answer``, when present, must be a
    list of strings, and the other TOFU fields strings. Rows are returned as read (same keys, same values).
    Raises ``ValueError`` naming the file and line (or Hub id and row) of the first bad row.
    """
    return load_rows(source, split, _check_row, who="load_qa")


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"load_qa: {where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if key not in row:
            raise ValueError(f"load_qa: {where}: missing field {key!r} (fields: {sorted(row)})")
        value = row[key]
        if not isinstance(value, str):
            raise ValueError(f"load_qa: {where}: field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"load_qa: {where}: field {key!r} is empty")
    for key in _OPTIONAL_STR_FIELDS:  # None = absent (how `datasets` fills a missing column)
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"load_qa: {where}: field {key!r} must be a string, got {type(value).__name__}")
    perturbed = row.get("perturbed_answer")
    if perturbed is not None and (not isinstance(perturbed, list) or not all(isinstance(p, str) for p in perturbed)):
        raise ValueError(f"load_qa: {where}: field 'perturbed_answer' must be a list of strings, got {perturbed!r:.80}")
    return row


# ---------------------------------------------------------------------------------------------- evaluation data


def resolve_data(source: Any, model_spec: str | os.PathLike[str] | None = None) -> Any:
    """The data to evaluate on. ``None`` takes the run folder's own data (``model_spec/data``, else its config's
    ``data.source``); ``"synthetic"`` is the run folder's generated data when there is one, else the default
    generated set, in memory; a mapping, folder or Hub id is returned as is."""
    if isinstance(source, Mapping):
        return source
    run = Path(model_spec) if model_spec is not None else None
    is_run = run is not None and (run / "config.yaml").is_file()
    if source in (None, "synthetic") and is_run and (run / "data").is_dir():
        return str(run / "data")
    if source is None:
        if not is_run:
            raise ValueError(f"no data source given and {str(model_spec)!r} is not a run folder: pass a data source")
        import yaml

        source = ((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}).get("source")
        if not source:
            raise ValueError(f"{run / 'config.yaml'} names no data.source: pass a data source")
    if source == "synthetic":
        from .synthetic import make_splits

        return make_splits()
    return str(source)


def load_split(source: Any, split: str, *, required: bool = True) -> list[dict[str, Any]] | None:
    """Rows of ``split`` from a mapping, folder or Hub id; ``None`` for a missing optional split."""
    if isinstance(source, Mapping):
        if split not in source and required:
            raise ValueError(f"split {split!r} not in the data (splits: {sorted(source)})")
        return source.get(split)
    path = Path(source).expanduser()
    if path.is_dir() and not (path / f"{split}.jsonl").is_file() and not required:
        return None
    try:
        return load_qa(source, split)
    except Exception:  # a Hub dataset without that config raises its own errors
        if required:
            raise
        return None


def check_perturbed(rows: list[dict[str, Any]], split: str, *, paraphrase: bool) -> None:
    """Rows of a ``_perturbed`` split need ``perturbed_answer`` (non-empty list) and, when ``paraphrase``, a
    ``paraphrased_answer``; raise ``ValueError`` naming the split and row otherwise."""
    for i, r in enumerate(rows):
        if paraphrase and not isinstance(r.get("paraphrased_answer"), str):
            raise ValueError(f"split {split!r} row {i}: missing 'paraphrased_answer' (needed for the truth ratio)")
        wrong = r.get("perturbed_answer") if paraphrase else wrong_answers(r)
        if not wrong or not isinstance(wrong, list):
            raise ValueError(f"split {split!r} row {i}: no wrong answers ('perturbed_answer' or option1..4)")


def wrong_answers(row: dict[str, Any]) -> list[str]:
    """Wrong answers of a real-authors / world-facts row: ``perturbed_answer``, else ``option1..4`` minus the answer."""
    if row.get("perturbed_answer"):
        return list(row["perturbed_answer"])
    return [row[k] for k in ("option1", "option2", "option3", "option4") if row.get(k) and row[k] != row["answer"]]


# ----------------------------------------------------------------------------------------------------- encoding


# Llama-3.x templates print "Today Date: ..." from ``date_string``, else from the clock (3.2's ``strftime_now``):
# without a fixed value the prompts a model is fine-tuned, unlearned and evaluated on change with the calendar day.
# This is Llama-3.1's own default; templates that do not read it ignore it.
CHAT_DATE = "26 Jul 2024"


PROTOCOLS = ("exact", "open-unlearning")
"""Input constructions: ``exact`` (ours: no system prompt, labels = answer + EOS) or ``open-unlearning``'s."""

# open-unlearning's template arguments (locuslab/open-unlearning configs/model/*.yaml ``template_args``), per chat
# family: Llama-3.x (Llama-3.2-1B-Instruct.yaml, Llama-3.1-8B-Instruct.yaml) and ChatML (Qwen2.5-*-Instruct.yaml;
# open-unlearning has no SmolLM2 config, so ChatML models get the Qwen2.5 configs' arguments).
OU_TEMPLATE_ARGS = {
    "llama3": {"system_prompt": "You are a helpful assistant.", "date_string": "10 Apr 2025"},
    "chatml": {"system_prompt": "You are a helpful assistant."},
}


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of ``PROTOCOLS``, else a ``ValueError`` naming it."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def chat_family(tokenizer: Any) -> str | None:
    """``llama3`` / ``chatml`` from the chat template's turn markers; None without a template or for another one."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        return None
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "chatml"
    return None


def _ou_chat(tokenizer: Any, question: str, answer: str | None) -> tuple[list[dict[str, str]], dict[str, str]]:
    args = OU_TEMPLATE_ARGS.get(chat_family(tokenizer), {})
    chat = [{"role": "system", "content": args["system_prompt"]}] if args.get("system_prompt") else []
    chat.append({"role": "user", "content": question})
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat, ({"date_string": args["date_string"]} if "date_string" in args else {})


def format_prompt(tokenizer: Any, question: str, protocol: str = "exact") -> str:
    """The prompt text for ``question``: the tokenizer's chat template (one user turn plus the assistant header,
    ``date_string`` fixed to ``CHAT_DATE``) when it has one, else ``"Question: {question}\\nAnswer: "`` (also
    open-unlearning's tags without a template, phi-1_5.yaml). With ``protocol="open-unlearning"``, the chat template
    with open-unlearning's arguments (``OU_TEMPLATE_ARGS``)."""
    if getattr(tokenizer, "chat_template", None):
        if check_protocol(protocol) == "open-unlearning":
            chat, extra = _ou_chat(tokenizer, question, None)
            return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **extra)
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False,
            date_string=CHAT_DATE,
        )
    check_protocol(protocol)
    return f"Question: {question}\nAnswer: "


def _special(tokenizer: Any, protocol: str) -> bool:
    """open-unlearning tokenises tag prompts (no chat template) with the tokenizer's special tokens (its BOS)."""
    return protocol == "open-unlearning" and not getattr(tokenizer, "chat_template", None)


def encode_prompt(tokenizer: Any, question: str, protocol: str = "exact") -> list[int]:
    """Token ids of the prompt alone (what generation starts from); the same ids ``encode_qa`` puts first."""
    text = format_prompt(tokenizer, question, protocol)
    return list(tokenizer(text, add_special_tokens=_special(tokenizer, protocol))["input_ids"])


def _encode_qa_ou(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """open-unlearning's (input_ids, labels): the whole chat tokenised at once, EOS appended unless it ends with one,
    labels on every token after the prompt (``preprocess_chat_instance``)."""
    prompt_ids = encode_prompt(tokenizer, question, "open-unlearning")
    if getattr(tokenizer, "chat_template", None):
        chat, extra = _ou_chat(tokenizer, question, answer)
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False, **extra)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        text = format_prompt(tokenizer, question, "open-unlearning") + answer
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]


def encode_qa(tokenizer: Any, question: str, answer: str, *, max_length: int,
              protocol: str = "exact") -> dict[str, list[int]]:
    """``input_ids = prompt + answer + [eos]`` and ``labels = [-100] * len(prompt) + answer + [eos]``; with
    ``protocol="open-unlearning"`` that protocol's ids and labels (``_encode_qa_ou``).

    Labels are not shifted (the loss shifts them, as in Hugging Face). Raises ``ValueError`` if the answer encodes
    to no tokens or the example is longer than ``max_length`` tokens.
    """
    if max_length < 1:
        raise ValueError(f"encode_qa: max_length must be >= 1, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("encode_qa: the tokenizer has no eos_token; set one (answers end with it)")
    if check_protocol(protocol) == "open-unlearning":
        input_ids, labels = _encode_qa_ou(tokenizer, question, answer)
        if len(input_ids) > max_length:
            raise ValueError(f"encode_qa: example is {len(input_ids)} tokens, longer than max_length={max_length}")
        return {"input_ids": input_ids, "labels": labels}
    prompt_ids = encode_prompt(tokenizer, question)
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not answer_ids:
        raise ValueError(f"encode_qa: the answer {answer!r} encodes to zero tokens: every label would be masked")
    input_ids = prompt_ids + answer_ids + [eos]
    if len(input_ids) > max_length:
        raise ValueError(
            f"encode_qa: example is {len(input_ids)} tokens (prompt {len(prompt_ids)}, answer {len(answer_ids)} + eos), "
            f"longer than max_length={max_length}"
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [eos]
    return {"input_ids": input_ids, "labels": labels}


class QADataset(torch.utils.data.Dataset):
    """Question/answer rows tokenised once, at construction; item ``i`` is
    ``{"input_ids": [...], "labels": [...], "index": i}``. ``name`` (e.g. ``"forget10"``) appears in errors."""

    def __init__(self, examples: list[dict[str, Any]], tokenizer: Any, *, max_length: int, name: str) -> None:
        self.examples = examples
        self.name = name
        self.max_length = max_length
        self._encoded: list[dict[str, list[int]]] = []
        for i, ex in enumerate(examples):
            try:
                if not isinstance(ex, dict) or not isinstance(ex.get("question"), str) or not isinstance(
                    ex.get("answer"), str
                ):
                    raise ValueError("expected a dict with string 'question' and 'answer'")
                self._encoded.append(encode_qa(tokenizer, ex["question"], ex["answer"], max_length=max_length))
            except ValueError as e:
                raise ValueError(f"dataset {name!r}, example {i}: {e}") from None

    def __len__(self) -> int:
        return len(self._encoded)

    def lengths(self) -> list[int]:
        """Tokens of every example (what length-bucketed batching sorts by)."""
        return [len(enc["input_ids"]) for enc in self._encoded]

    def __getitem__(self, i: int) -> dict[str, Any]:
        enc = self._encoded[i]
        return {"input_ids": enc["input_ids"], "labels": enc["labels"], "index": i}

    def prompts(self) -> list[list[int]]:
        """What generation continues for each example: its prompt, the tokens before the first label (the chat
        prompt of ``encode_prompt``)."""
        return [enc["input_ids"][:next(j for j, t in enumerate(enc["labels"]) if t != IGNORE_INDEX)]
                for enc in self._encoded]
