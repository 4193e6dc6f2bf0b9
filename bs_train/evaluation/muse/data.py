"""MUSE's evaluation data, read in its Hub layout, and how each probe is turned into tokens.

MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"; ``muse-bench/MUSE-News``,
``muse-bench/MUSE-Books``, or any local folder of the same ``<subset>/<split>.jsonl`` layout) evaluates with:

* ``verbmem/forget``: ``prompt`` (an excerpt of the forget set) and ``gt`` (its continuation);
* ``knowmem/{forget,retain}_qa``: questions about the forget / retain text, ``*_qa_icl``: in-context examples;
* ``privleak/{forget,retain,holdout}``: passages that were trained on (forget), kept (retain) and never seen (holdout).

``load_muse(source, max_rows)`` reads and checks them once (a malformed row is named by file and line before any
model loads). The encodings follow open-unlearning's MUSE data (``configs/data/datasets/MUSE_*.yaml``,
``src/data/pretraining.py``, ``src/data/qa.py``, ``src/data/utils.py``): a VerbMem prompt is its raw text with the
tokenizer's special tokens (no chat template: a continuation, not a question); the ground truth is scored after
``prompt + " " + gt`` tokenised as one text (``insert_space: True``), so ES and EM see the passage as the model reads
it; a KnowMem prompt is the in-context examples and the question, as turns of the tokenizer's chat template when it
has one, else in the tags of open-unlearning's base-model configs (``Question: ...\\nAnswer: ...\\n\\n``); a PrivLeak
passage is its text with special tokens, cut at ``MIA_MAX_TOKENS``, every token after the first scored.
``protocol="open-unlearning"`` differs only where that code does: the chat template with its system prompt
(``data.qa.OU_TEMPLATE_ARGS``), the ground truths decoded back from the tokens, and (in ``suite.py``) the last
labelled token left out of the token-wise metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ...data import CHAT_DATE, OU_TEMPLATE_ARGS, chat_family, check_protocol, load_qa, load_rows, load_texts
from ...data.rows import check_fields
from ...data.text import special_prefix

MIA_MAX_TOKENS = 2048
"""PrivLeak / MIA passages are cut at this many tokens after the special prefix (open-unlearning MUSE_MIA.yaml
``max_length: 2048``)."""
VERBMEM_MAX_NEW_TOKENS = 128
"""VerbMem continuation length (open-unlearning forget_verbmem_ROUGE.yaml ``max_new_tokens: 128``)."""
KNOWMEM_MAX_NEW_TOKENS = 32
"""KnowMem answer length (open-unlearning forget_knowmem_ROUGE.yaml / retain_knowmem_ROUGE.yaml: 32)."""
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
"""Where a KnowMem answer is cut (the same files' ``stopwords``; the EOS cuts it too)."""
QA_TAGS = ("Question: ", "\n", "Answer: ", "\n\n")
"""(user start, user end, assistant start, assistant end) without a chat template: open-unlearning's
configs/model/Llama-2-7b-hf.yaml ``template_args``, the base model MUSE's targets are fine-tuned from."""
SPLITS = {
    "verbmem": "verbmem/forget",
    "knowmem_forget": "knowmem/forget_qa", "knowmem_forget_icl": "knowmem/forget_qa_icl",
    "knowmem_retain": "knowmem/retain_qa", "knowmem_retain_icl": "knowmem/retain_qa_icl",
    "privleak_forget": "privleak/forget", "privleak_holdout": "privleak/holdout",
}


def _check_verbmem(row: Any, where: str) -> dict[str, Any]:
    return check_fields(row, where, ("prompt", "gt"), who="MUSE verbmem")


@dataclass
class MuseData:
    """MUSE's probes of one corpus, each split's rows as read (``max_rows``: only the first that many of each probe
    split; the in-context examples are always whole)."""

    source: str
    verbmem: list[dict[str, str]]
    knowmem_forget: list[dict[str, str]]
    knowmem_forget_icl: list[dict[str, str]]
    knowmem_retain: list[dict[str, str]]
    knowmem_retain_icl: list[dict[str, str]]
    privleak_forget: list[str]
    privleak_holdout: list[str]
    max_rows: int | None = None


def load_muse(source: str | os.PathLike[str], max_rows: int | None = None) -> MuseData:
    """Every probe split of a MUSE corpus (``muse-bench/MUSE-News``, ``-Books`` or a local folder of that layout),
    checked; ``max_rows`` bounds each probe split (a quick, stated look)."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    cap = (lambda rows: rows[:max_rows]) if max_rows else (lambda rows: rows)
    return MuseData(
        source=str(source),
        verbmem=cap(load_rows(source, SPLITS["verbmem"], _check_verbmem, who="MUSE verbmem")),
        knowmem_forget=cap(load_qa(source, SPLITS["knowmem_forget"])),
        knowmem_forget_icl=load_qa(source, SPLITS["knowmem_forget_icl"]),
        knowmem_retain=cap(load_qa(source, SPLITS["knowmem_retain"])),
        knowmem_retain_icl=load_qa(source, SPLITS["knowmem_retain_icl"]),
        privleak_forget=cap(load_texts(source, SPLITS["privleak_forget"])),
        privleak_holdout=cap(load_texts(source, SPLITS["privleak_holdout"])),
        max_rows=max_rows,
    )


# ---- encodings --------------------------------------------------------------------------------------------------


def _ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def verbmem_item(tokenizer: Any, row: dict[str, str], protocol: str = "exact") -> dict[str, Any]:
    """A VerbMem row as ``{"prompt": ids, "input_ids": prompt + continuation ids, "labels": the continuation only,
    "gt": the reference text}``; ``prompt + " " + gt`` is tokenised as one text."""
    exact = check_protocol(protocol) == "exact"
    prompt = _ids(tokenizer, row["prompt"])
    full = _ids(tokenizer, row["prompt"] + " " + row["gt"])
    if exact and (full[:len(prompt)] != prompt or len(full) <= len(prompt)):  # tokens merged across the boundary
        full = prompt + _ids(tokenizer, " " + row["gt"], special=False)  # (open-unlearning cuts at prompt length)
    cont = full[len(prompt):]
    gt = row["gt"].strip() if exact else _decode(tokenizer, cont).replace(_decode(tokenizer, prompt), "").strip()
    return {"prompt": prompt, "input_ids": full, "labels": [-100] * len(prompt) + cont, "gt": gt}


def knowmem_prompt(tokenizer: Any, icl: list[dict[str, str]], question: str, protocol: str = "exact",
                   answer: str | None = None) -> list[int]:
    """The in-context examples and ``question`` as prompt ids: turns of the chat template (with open-unlearning's
    system prompt under its protocol) when the tokenizer has one, else ``QA_TAGS`` text with special tokens. With
    ``answer``: the whole exchange, the answer as the last turn (what open-unlearning decodes its ground truth from)."""
    pairs = [(r["question"], r["answer"]) for r in icl]
    if getattr(tokenizer, "chat_template", None):
        chat = []
        extra: dict[str, str] = {"date_string": CHAT_DATE}
        if check_protocol(protocol) == "open-unlearning":
            args = OU_TEMPLATE_ARGS.get(chat_family(tokenizer), {})
            chat += [{"role": "system", "content": args["system_prompt"]}] if args.get("system_prompt") else []
            extra = {"date_string": args["date_string"]} if "date_string" in args else {}
        for q, a in pairs:
            chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        chat.append({"role": "user", "content": question})
        if answer is not None:
            chat.append({"role": "assistant", "content": answer})
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=answer is None, tokenize=False, **extra)
        return _ids(tokenizer, text, special=False)
    check_protocol(protocol)
    u0, u1, a0, a1 = QA_TAGS
    text = "".join(f"{u0}{q}{u1}{a0}{a}{a1}" for q, a in pairs) + f"{u0}{question}{u1}{a0}" + (answer or "")
    return _ids(tokenizer, text)


def knowmem_reference(tokenizer: Any, icl: list[dict[str, str]], row: dict[str, str], protocol: str = "exact") -> str:
    """The answer a KnowMem generation is scored against: the row's, stripped; under open-unlearning's protocol
    decoded back from the tokens of the whole exchange with the prompt's text removed, as its evaluator does."""
    if check_protocol(protocol) == "exact":
        return row["answer"].strip()
    full = _decode(tokenizer, knowmem_prompt(tokenizer, icl, row["question"], protocol, answer=row["answer"]))
    return full.replace(_decode(tokenizer, knowmem_prompt(tokenizer, icl, row["question"], protocol)), "").strip()


def cut_answer(text: str, stops: tuple[str, ...] = KNOWMEM_STOP) -> str:
    """A generated answer up to its first stop string, stripped (open-unlearning's ``eval_text_similarity``)."""
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text.strip()


def mia_item(tokenizer: Any, text: str) -> dict[str, list[int]]:
    """A PrivLeak passage: its ids with special tokens, cut at ``MIA_MAX_TOKENS``, every token after the first a
    label (open-unlearning's ``CompletionDataset`` with no prefix)."""
    ids = _ids(tokenizer, text)[:len(special_prefix(tokenizer)) + MIA_MAX_TOKENS]
    return {"input_ids": ids, "labels": [-100] + ids[1:]}
