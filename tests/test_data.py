"""Tests for the data layer: TOFU-format loading and its errors, answer-only labels, batching, the resumable
forget/retain sampler, the offline byte tokenizer / tiny Llama, and the synthetic fictitious-author dataset."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bs_train.data import ForgetRetainSampler, QADataset, collate, encode_prompt, encode_qa, load_qa
from bs_train.data.synthetic import make_splits, write_folder
from bs_train.tiny import byte_tokenizer, tiny_llama

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write_jsonl(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------- load_qa


def test_synthetic_folder_round_trips_through_load_qa(tmp_path):
    splits = make_splits(n_authors=10, qa_per_author=4, seed=3)
    folder = write_folder(tmp_path / "synth", splits)
    for name, rows in splits.items():
        assert load_qa(folder, name) == rows
        assert load_qa(str(folder), name) == rows
    loaded = load_qa(folder, "forget10_perturbed")[0]
    assert isinstance(loaded["perturbed_answer"], list) and len(loaded["perturbed_answer"]) == 5


def test_load_qa_reports_invalid_json_with_file_and_line(tmp_path):
    good = json.dumps({"question": "Q?", "answer": "A."})
    folder = _write_jsonl(tmp_path, "forget", [good, good, '{"question": "Q?", "answer": '])
    with pytest.raises(ValueError, match=r"forget\.jsonl:3: invalid JSON"):
        load_qa(folder, "forget")


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"question": "Q?"}, r"missing field 'answer'"),
        ({"answer": "A."}, r"missing field 'question'"),
        ({"question": "Q?", "answer": "  "}, r"field 'answer' is empty"),
        ({"question": "", "answer": "A."}, r"field 'question' is empty"),
        ({"question": "Q?", "answer": 3}, r"field 'answer' must be a string, got int"),
        ({"question": "Q?", "answer": "A.", "perturbed_answer": "B."}, r"field 'perturbed_answer' must be a list of strings"),
        ({"question": "Q?", "answer": "A.", "perturbed_answer": ["B.", 1]}, r"field 'perturbed_answer' must be a list"),
        (["Q?", "A."], r"expected a JSON object, got list"),
    ],
)
def test_load_qa_rejects_malformed_rows_naming_file_line_and_field(tmp_path, row, problem):
    folder = _write_jsonl(tmp_path, "retain", [json.dumps({"question": "Q?", "answer": "A."}), json.dumps(row)])
    with pytest.raises(ValueError, match=r"retain\.jsonl:2: " + problem):
        load_qa(folder, "retain")


def test_load_qa_missing_split_lists_the_available_ones(tmp_path):
    row = json.dumps({"question": "Q?", "answer": "A."})
    _write_jsonl(tmp_path, "forget10", [row])
    _write_jsonl(tmp_path, "retain90", [row])
    with pytest.raises(ValueError, match=r"split 'forget05' not found.*forget10, retain90"):
        load_qa(tmp_path, "forget05")


def test_load_qa_empty_split_is_an_error_naming_it(tmp_path):
    _write_jsonl(tmp_path, "forget01", ["", "  "])
    with pytest.raises(ValueError, match=r"split 'forget01' is empty"):
        load_qa(tmp_path, "forget01")


def test_load_qa_nonexistent_folder_and_hub_without_datasets(tmp_path):
    with pytest.raises(ValueError, match=r"no such data folder"):
        load_qa(tmp_path / "missing", "forget10")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match=r"needs the `datasets` package"):
            load_qa("locuslab/TOFU", "forget10")


@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"no local TOFU copy at {TOFU_DIR}")
def test_real_tofu_copy_loads_with_expected_sizes(tok):
    forget = load_qa(TOFU_DIR, "forget10")
    perturbed = load_qa(TOFU_DIR, "forget10_perturbed")
    full = load_qa(TOFU_DIR, "full")
    assert len(forget) == 400 and len(perturbed) == 400 and len(full) == 4000
    assert forget == full[3600:]
    assert all(len(r["perturbed_answer"]) == 5 for r in perturbed)
    assert [r["question"] for r in perturbed] == [r["question"] for r in forget]
    ds = QADataset(forget, tok, max_length=1024, name="forget10")
    assert len(ds) == 400


# ----------------------------------------------------------------------------------------------------- encoding


def test_encode_qa_labels_exactly_the_answer_tokens_and_eos(tok):
    question, answer = "Where was Ada born?", "Ada was born in Lisbon, Portugal."
    enc = encode_qa(tok, question, answer, max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    prompt = encode_prompt(tok, question)
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    labelled = [y for y in labels if y != -100]
    assert labelled[-1] == tok.eos_token_id
    assert tok.decode(labelled[:-1]) == answer
    assert tok.decode(ids) == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
    # labels are unshifted: where labelled, the label is the input token at the same position
    assert all(y == x for x, y in zip(ids, labels) if y != -100)


def test_encode_qa_without_chat_template_uses_question_answer_format(tok):
    plain = byte_tokenizer()
    plain.chat_template = None
    enc = encode_qa(plain, "Q?", "A.", max_length=64)
    assert plain.decode(enc["input_ids"]) == "Question: Q?\nAnswer: A.<|im_end|>"
    assert plain.decode([y for y in enc["labels"] if y != -100]) == "A.<|im_end|>"


def test_chat_prompt_does_not_depend_on_the_calendar():
    """A Llama-3.2-style template prints today's date unless ``date_string`` is given: the prompt is fixed."""
    from bs_train.data import CHAT_DATE, format_prompt

    dated = byte_tokenizer()
    dated.chat_template = ("{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}"
                           "{% endif %}Today Date: {{ date_string }}\n{{ messages[0]['content'] }}\nA:")
    assert format_prompt(dated, "Q?") == f"Today Date: {CHAT_DATE}\nQ?\nA:"


def test_encode_qa_refuses_overlong_examples_and_empty_answers(tok):
    n = len(encode_qa(tok, "Q?", "A long answer.", max_length=1000)["input_ids"])
    assert len(encode_qa(tok, "Q?", "A long answer.", max_length=n)["input_ids"]) == n
    with pytest.raises(ValueError, match=rf"example is {n} tokens.*max_length={n - 1}"):
        encode_qa(tok, "Q?", "A long answer.", max_length=n - 1)
    with pytest.raises(ValueError, match=r"encodes to zero tokens"):
        encode_qa(tok, "Q?", "", max_length=1000)


def test_qadataset_errors_name_the_dataset_and_example(tok):
    rows = [{"question": "Q?", "answer": "short"}, {"question": "Q?", "answer": "x" * 500}]
    with pytest.raises(ValueError, match=r"dataset 'forget10', example 1: .*longer than max_length=128"):
        QADataset(rows, tok, max_length=128, name="forget10")
    with pytest.raises(ValueError, match=r"dataset 'retain90', example 0: .*zero tokens"):
        QADataset([{"question": "Q?", "answer": ""}], tok, max_length=128, name="retain90")


def test_collate_right_pads_with_masks_and_ignored_labels(tok):
    rows = [{"question": "Q?", "answer": "A."}, {"question": "A longer question?", "answer": "A longer answer."}]
    ds = QADataset(rows, tok, max_length=128, name="t")
    assert ds.examples is rows and len(ds) == 2
    items = [ds[1], ds[0]]
    batch = collate(items, pad_id=tok.pad_token_id)
    lengths = [len(it["input_ids"]) for it in items]
    b, t = 2, max(lengths)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (b, t) and batch[key].dtype == torch.int64
    assert batch["index"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for j, (it, n) in enumerate(zip(items, lengths)):
        assert batch["input_ids"][j, :n].tolist() == it["input_ids"]
        assert batch["labels"][j, :n].tolist() == it["labels"]
        assert (batch["input_ids"][j, n:] == tok.pad_token_id).all()
        assert (batch["labels"][j, n:] == -100).all()
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)


# ----------------------------------------------------------------------------------------------------- sampler


def _take(sampler: ForgetRetainSampler, epochs: int) -> list[tuple[list[int], list[int]]]:
    return [batch for _ in range(epochs) for batch in sampler]


def _take_steps(sampler: ForgetRetainSampler, n: int) -> list[tuple[list[int], list[int]]]:
    """The next ``n`` batches, across epochs, stopping mid-epoch as a run interrupted by a checkpoint would."""
    out: list[tuple[list[int], list[int]]] = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_sampler_covers_each_forget_index_once_per_epoch_deterministically():
    s = ForgetRetainSampler(n_forget=10, n_retain=7, batch_size=4, seed=1)
    assert s.steps_per_epoch == 3
    epochs = [list(s) for _ in range(3)]
    for batches in epochs:
        assert len(batches) == 3
        assert sorted(i for f, _ in batches for i in f) == list(range(10))
        assert all(len(f) == len(r) for f, r in batches)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    retain = [i for batches in epochs for _, r in batches for i in r]  # 30 = 4 full passes + 2 over 7 retain rows
    assert sorted(retain[:28]) == sorted(list(range(7)) * 4)
    assert _take(ForgetRetainSampler(10, 7, 4, seed=1), 3) == [b for batches in epochs for b in batches]
    assert _take(ForgetRetainSampler(10, 7, 4, seed=2), 3) != [b for batches in epochs for b in batches]


def test_sampler_without_retain_set_and_drop_last():
    s = ForgetRetainSampler(n_forget=5, n_retain=0, batch_size=2, seed=0, drop_last=True)
    batches = list(s)
    assert s.steps_per_epoch == 2 and len(batches) == 2
    assert all(len(f) == 2 and r == [] for f, r in batches)
    with pytest.raises(ValueError, match="empty forget set"):
        ForgetRetainSampler(0, 5, 2, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ForgetRetainSampler(5, 5, 0, seed=0)


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4, 7])
def test_sampler_resumed_from_state_dict_continues_the_same_sequence(stop_after):
    reference = _take(ForgetRetainSampler(10, 7, 4, seed=5), 4)  # 12 steps
    first = ForgetRetainSampler(10, 7, 4, seed=5)
    seen = _take_steps(first, stop_after)  # stops mid-epoch, or right at an epoch boundary (stop_after=3)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    resumed = ForgetRetainSampler(10, 7, 4, seed=5)
    resumed.load_state_dict(state)
    seen += _take_steps(resumed, len(reference) - stop_after)
    assert seen == reference
    assert resumed.epoch == 4 and resumed.step == 0


def test_sampler_refuses_state_from_other_settings():
    state = ForgetRetainSampler(10, 7, 4, seed=5).state_dict()
    with pytest.raises(ValueError, match=r"saved n_forget=10 but this sampler has n_forget=11"):
        ForgetRetainSampler(11, 7, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved seed=5"):
        ForgetRetainSampler(10, 7, 4, seed=6).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------- tiny


def test_byte_tokenizer_round_trips_text_and_renders_chatml(tok):
    text = "Hello, world!\n  two  spaces\ttab, 'quotes' and 1234.5 ~^_^~"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.decode(tok("naïve 日本", add_special_tokens=False)["input_ids"]) == "naïve 日本"
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<|pad|>", "<|im_end|>", None)
    assert len(tok) == 259
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_start|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|im_start|>")]


def test_tiny_llama_is_deterministic_per_seed_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_llama(len(tok), seed=0)
    assert torch.equal(torch.rand(3), expected)  # global RNG untouched
    b = tiny_llama(len(tok), seed=0)
    c = tiny_llama(len(tok), seed=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.lm_head.weight.data_ptr() != a.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([encode_qa(tok, "Q?", "A.", max_length=64)["input_ids"]])
    with torch.no_grad():
        logits = a(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


# ----------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_splits_are_deterministic_per_seed():
    assert make_splits(seed=0) == make_splits(seed=0)
    assert make_splits(seed=0)["full"] != make_splits(seed=1)["full"]


def test_synthetic_forget_retain_partition_full_like_tofu():
    splits = make_splits(n_authors=20, qa_per_author=10, seed=0)
    full = splits["full"]
    assert len(full) == 200 and len({r["question"] for r in full}) == 200
    for pct, authors in ((1, 1), (5, 1), (10, 2)):
        forget, retain = splits[f"forget{pct:02d}"], splits[f"retain{100 - pct:02d}"]
        assert len(forget) == authors * 10
        assert retain + forget == full  # the forget split is the last authors, retain the rest: disjoint, union full
        holdout = splits[f"holdout{pct:02d}"]
        assert len(holdout) == len(forget) and not {r["question"] for r in holdout} & {r["question"] for r in full}
        perturbed = splits[f"forget{pct:02d}_perturbed"]
        assert [{"question": r["question"], "answer": r["answer"]} for r in perturbed] == forget
    for row in splits["forget10_perturbed"] + splits["retain_perturbed"]:
        assert len(row["perturbed_answer"]) == 5 and len(set(row["perturbed_answer"])) == 5
        assert row["paraphrased_answer"] != row["answer"] and row["paraphrased_question"] != row["question"]
        assert row["paraphrased_answer"] not in row["perturbed_answer"]
    retain_questions = {r["question"] for r in splits["retain90"]}
    assert splits["retain_perturbed"] and all(r["question"] in retain_questions for r in splits["retain_perturbed"])
