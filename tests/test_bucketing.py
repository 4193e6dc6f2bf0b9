"""Length-bucketed batches (``train.bucket_window``): less padding, the same examples, an exact resume.

What a user relies on when turning it on: every epoch still shows each forget example exactly once and the retain
stream hands out the same rows, the padded tokens per step drop, a resumed run continues with exactly the batches an
uninterrupted one would have drawn, and with the option off nothing changes.
"""

from __future__ import annotations

import random

import pytest

from bs_train.data import ForgetRetainSampler


def _lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(20, 160) for _ in range(n)]


def _padded(batches, lengths, micro: int) -> int:
    """Tokens a trainer pads to: every micro-batch (contiguous slices of a step, as ``_micro_batches``) is as long
    as its longest row."""
    total = 0
    for idx in batches:
        size = -(-len(idx) // micro)
        for m in range(micro):
            part = idx[m * size:(m + 1) * size]
            total += len(part) * max((lengths[i] for i in part), default=0)
    return total


def _epochs(sampler, n):
    out = []
    for _ in range(n):
        out.extend(list(iter(sampler)))
    return out


FL, RL = _lengths(203, 1), _lengths(517, 2)


def test_bucketing_keeps_every_example_once_per_epoch_and_the_retain_rows():
    plain = ForgetRetainSampler(203, 517, 32, seed=3)
    bucketed = ForgetRetainSampler(203, 517, 32, seed=3, bucket_window=4, forget_lengths=FL, retain_lengths=RL)
    assert bucketed.steps_per_epoch == plain.steps_per_epoch
    for epoch in range(3):
        got = list(iter(bucketed))
        ref = list(iter(plain))
        assert sorted(i for f, _ in got for i in f) == list(range(203)), epoch
        # the same retain stream: an epoch hands out the same retain rows (the short batch may sit elsewhere)
        assert sorted(i for _, r in got for i in r) == sorted(i for _, r in ref for i in r)
        assert [len(r) for _, r in got] == [len(f) for f, _ in got]


def test_bucketing_cuts_padding():
    plain = _epochs(ForgetRetainSampler(203, 517, 32, seed=0), 2)
    bucketed = _epochs(ForgetRetainSampler(203, 517, 32, seed=0, bucket_window=50, forget_lengths=FL,
                                           retain_lengths=RL), 2)
    real = sum(FL[i] for f, _ in plain for i in f)
    for micro in (1, 4):
        waste_plain = _padded([f for f, _ in plain], FL, micro) - real
        waste_bucketed = _padded([f for f, _ in bucketed], FL, micro) - real
        assert waste_bucketed < 0.25 * waste_plain, (micro, waste_plain, waste_bucketed)
    r_real = sum(RL[i] for _, r in plain for i in r)
    assert _padded([r for _, r in bucketed], RL, 4) - r_real < 0.5 * (_padded([r for _, r in plain], RL, 4) - r_real)


def test_bucketed_batch_order_is_random_not_sorted():
    got = list(iter(ForgetRetainSampler(400, 0, 8, seed=0, bucket_window=50, forget_lengths=_lengths(400, 5))))
    firsts = [max(_lengths(400, 5)[i] for i in f) for f, _ in got]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


@pytest.mark.parametrize("cut", [1, 5, 7, 13])
def test_bucketed_resume_is_exact(cut):
    kw = dict(seed=7, bucket_window=3, forget_lengths=FL, retain_lengths=RL)
    whole = _epochs(ForgetRetainSampler(203, 517, 32, **kw), 3)
    first = ForgetRetainSampler(203, 517, 32, **kw)
    it, head = iter(first), []
    for _ in range(cut):
        try:
            head.append(next(it))
        except StopIteration:
            it = iter(first)
            head.append(next(it))
    resumed = ForgetRetainSampler(203, 517, 32, **kw)
    resumed.load_state_dict(first.state_dict())
    rest = []
    while len(head) + len(rest) < len(whole):
        rest.extend(list(iter(resumed)))
    assert head + rest[: len(whole) - len(head)] == whole


def test_off_is_the_plain_shuffle_and_a_bucketed_state_does_not_resume_a_plain_run():
    a = _epochs(ForgetRetainSampler(203, 517, 32, seed=2), 2)
    b = _epochs(ForgetRetainSampler(203, 517, 32, seed=2, bucket_window=0, forget_lengths=FL), 2)
    assert a == b
    bucketed = ForgetRetainSampler(203, 517, 32, seed=2, bucket_window=5, forget_lengths=FL, retain_lengths=RL)
    with pytest.raises(ValueError, match="bucket_window"):
        ForgetRetainSampler(203, 517, 32, seed=2).load_state_dict(bucketed.state_dict())


def test_bucketing_without_lengths_is_refused_by_name():
    with pytest.raises(ValueError, match="bucket_window=4 needs the n_forget=10 forget lengths"):
        ForgetRetainSampler(10, 0, 2, seed=0, bucket_window=4)
    with pytest.raises(ValueError, match="bucket_window must be >= 0"):
        ForgetRetainSampler(10, 0, 2, seed=0, bucket_window=-1)


def test_a_bucketed_unlearning_run_resumes_onto_the_uninterrupted_curve(original, tmp_path):
    """The trainer with ``train.bucket_window`` on: a run killed mid-way and resumed logs the same steps as one
    that never stopped (the sampler's bucketed order is part of its saved position)."""
    import json

    from bs_train.config import load_config
    from bs_train.trainer import StopRun, run

    args = ["train.batch_size=2", "train.grad_accum=2", f"model.path={original / 'final'}",
            f"data.source={original / 'data'}", "method.name=graddiff", "train.lr=1e-3", "train.max_steps=5",
            "train.checkpoint_every=2", "train.export=false", "train.bucket_window=3"]
    full = load_config(None, args + [f"output_dir={tmp_path / 'full'}"], command="unlearn")
    run(full, progress=False)
    cut = load_config(None, args + [f"output_dir={tmp_path / 'cut'}"], command="unlearn")
    with pytest.raises(StopRun):
        run(cut, progress=False, stop_after=3)
    run(cut, progress=False)
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("full", "cut"))
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for ma, mb in zip(a, b):
        for key in ("loss", "forget", "retain"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-6), (key, ma, mb)
