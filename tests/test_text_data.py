"""Raw-text training data (MUSE, WMDP): splits in the benchmarks' layouts, token windows, the config's benchmark
defaults, and every method training on windows with no change to the fused primitives (``bs_train/data/text.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from bs_kernels import IGNORE_INDEX
from bs_train.config import load_config
from bs_train.data import TextDataset, load_rows, load_texts, token_windows
from bs_train.data.synthetic import make_muse, make_wmdp, write_folder
from bs_train.data.text import JOIN, special_prefix
from bs_train.tiny import byte_tokenizer

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def muse(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("muse") / "MUSE-Synthetic", make_muse(seed=1))


def test_splits_are_read_in_the_hub_layout_and_joined_with_plus(muse, tmp_path):
    forget = load_texts(muse, "raw/forget")
    assert forget == [r["text"] for r in make_muse(seed=1)["raw/forget"]]
    both = load_texts(muse, "raw/forget+raw/retain1")
    assert both == forget + load_texts(muse, "raw/retain1")
    with pytest.raises(ValueError, match=r"split 'raw/missing' not found.*raw/forget"):
        load_texts(muse, "raw/missing")
    with pytest.raises(ValueError, match=r"must be a name like"):
        load_texts(muse, "../raw/forget")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "forget.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r"forget.jsonl:2: missing field 'text'"):
        load_texts(tmp_path, "raw/forget")
    wmdp = write_folder(tmp_path / "wmdp", make_wmdp())  # a flat folder: WMDP's corpora
    assert len(load_texts(wmdp, "cyber-forget-corpus")) == 3


def _llama32():
    from test_protocol import llama32_tokenizer

    return llama32_tokenizer()


@pytest.mark.parametrize("tok_fn", [byte_tokenizer, _llama32], ids=["no BOS (byte)", "BOS (Llama-3.2)"])
def test_windows_cover_the_joined_stream_once_each_behind_the_tokenizers_prefix(tok_fn):
    tok = tok_fn()
    texts = ["First document, a few words long.", "Second one.", "Third: " + "word " * 40]
    prefix = special_prefix(tok)
    wins = token_windows(texts, tok, 16)
    stream = tok(JOIN.join(texts), add_special_tokens=False)["input_ids"]
    assert all(w[:len(prefix)] == prefix and len(w) <= 16 for w in wins)
    assert all(len(w) == 16 for w in wins[:-1])
    assert [t for w in wins for t in w[len(prefix):]] == list(stream)  # every token once, in order
    ds = TextDataset(texts, tok, window=16, name="t", prefix_tokens=4)
    item = ds[0]
    assert item["labels"][0] == IGNORE_INDEX and item["labels"][1:] == item["input_ids"][1:]
    assert ds.prompts()[0] == wins[0][:4] and ds.lengths() == [len(w) for w in wins]


def test_the_benchmark_sets_splits_and_window_and_refuses_what_has_no_meaning_on_text():
    muse = load_config(None, ["data.benchmark=muse", "data.source=x"], command="unlearn").data
    assert (muse.forget_split, muse.retain_split, muse.window_tokens) == ("raw/forget", "raw/retain1", 2048)
    wmdp = load_config(None, ["data.benchmark=wmdp", "data.source=x"], command="unlearn").data
    assert (wmdp.forget_split, wmdp.retain_split, wmdp.window_tokens) == ("cyber-forget-corpus",
                                                                          "cyber-retain-corpus", 512)
    tofu = load_config(None, [], command="unlearn").data
    assert (tofu.forget_split, tofu.retain_split, tofu.window_tokens) == ("forget10", "retain90", None)
    for method in ("dpo", "altpo"):
        with pytest.raises(ValueError, match=rf"method.name={method} prefers another answer.*data.benchmark=muse"):
            load_config(None, ["data.benchmark=muse", "data.source=x", f"method.name={method}"], command="unlearn")
    with pytest.raises(ValueError, match="data.source=synthetic is TOFU-format QA"):
        load_config(None, ["data.benchmark=wmdp"], command="unlearn")
    with pytest.raises(ValueError, match="data.window_tokens is for raw-text benchmarks"):
        load_config(None, ["data.window_tokens=64"], command="unlearn")


@pytest.fixture(scope="module")
def text_original(muse, tmp_path_factory) -> Path:
    from bs_train.trainer import run

    out = tmp_path_factory.mktemp("text_runs") / "original"
    run(load_config(None, ["model.path=tiny", "data.benchmark=muse", f"data.source={muse}", "data.window_tokens=96",
                           "train.batch_size=4", "train.epochs=6", "train.lr=3e-3", "train.warmup_steps=1",
                           f"output_dir={out}"], command="finetune"), progress=False)
    return out


def _window_nll(model_dir: Path, muse: Path) -> float:
    from bs_train.evaluation.scoring import score_encoded
    from bs_train.model import load_model

    model, tok = load_model(str(model_dir))
    ds = TextDataset(load_texts(muse, "raw/forget"), tok, window=96, name="raw/forget")
    scored = score_encoded(model, [ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)
    return sum(s["avg_nll"] for s in scored) / len(scored)


@pytest.mark.parametrize("method", ["ga", "npo", "bs_t", "bs_s"])
def test_every_method_unlearns_raw_text_windows(method, muse, text_original, tmp_path):
    from bs_train.trainer import run

    out = tmp_path / method
    run(load_config(None, ["data.benchmark=muse", f"data.source={muse}", "data.window_tokens=96",
                           f"model.path={text_original / 'final'}", f"method.name={method}", "train.lr=2e-3",
                           "train.batch_size=4", "train.epochs=3", "train.warmup_steps=0", "method.bss_samples=2",
                           "method.bss_max_new_tokens=12", "method.bss_prefix_tokens=8", "train.squeezing_every=2",
                           "train.squeezing_beliefs=2", "train.squeezing_max_new_tokens=8", f"output_dir={out}"],
                    command="unlearn"), progress=False)
    assert _window_nll(out / "final", muse) > _window_nll(text_original / "final", muse) + 0.05
    squeezing = json.loads((out / "squeezing.json").read_text())
    assert squeezing["history"][0]["step"] == 0 and squeezing["beliefs"]  # beliefs drawn from window prefixes


def test_bss_beliefs_continue_the_windows_prefix(muse):
    from bs_train import methods
    from bs_train.config import MethodConfig

    tok = byte_tokenizer()
    ds = TextDataset(load_texts(muse, "raw/forget"), tok, window=64, name="raw/forget", prefix_tokens=10)
    st = methods.MethodState(MethodConfig(name="bs_s", bss_prefix_tokens=10), "torch")
    methods.setup_bss(st, None, tokenizer=tok, dataset=ds)
    assert st.prompts == [w[:10] for w in ds.windows]


def test_rows_of_a_hub_id_need_datasets_or_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="no such data folder"):
        load_rows(tmp_path / "absent", "raw/forget", lambda r, w: r)
