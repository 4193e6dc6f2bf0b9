"""The belief sampler on CPU with a tiny random Llama: exactness against HF generate, reproducibility, and the
sampling distribution itself (a chi-square test against softmax(logits / T) with top-k / top-p applied)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from bs_train.sampler import SamplingConfig, check_supported, prompts_from_padded, sample
from bs_train.tiny import tiny_llama

VOCAB = 61
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [1, 2, 3, 4, 5], [40]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, seed=3)


def hf_greedy(model, prompts, max_new, eos, pad):
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=pad)
    return out[:, length:]


def test_greedy_equals_hf_generate_with_padding_and_eos(model):
    free = sample(model, PROMPTS, SamplingConfig(n=1, max_new_tokens=12, temperature=0), eos_id=VOCAB, pad_id=0)
    # make a token that row 1 emits at step 3 the EOS, so rows stop at different times
    eos = int(free.tokens[1, 0, 3])
    ours = sample(model, PROMPTS, SamplingConfig(n=2, max_new_tokens=12, temperature=0, sync_every=2), eos_id=eos,
                  pad_id=0)
    want = hf_greedy(model, PROMPTS, 12, eos, 0)
    for i in range(len(PROMPTS)):
        for j in range(2):
            n = int(ours.lengths[i, j])
            got = ours.tokens[i, j]
            assert got[:n].tolist() == want[i, :n].tolist()
            assert (got[n:] == 0).all()
            stopped = eos in want[i].tolist()
            assert n == (want[i].tolist().index(eos) + 1 if stopped else 12)
    assert int(ours.lengths[1, 0]) <= 4


def test_logprobs_are_the_models_own(model):
    s = sample(model, PROMPTS[:2], SamplingConfig(n=2, max_new_tokens=6, temperature=1.0), eos_id=VOCAB, pad_id=0,
               generator=torch.Generator().manual_seed(0))
    for i, prompt in enumerate(PROMPTS[:2]):
        for j in range(2):
            seq = torch.tensor([prompt + s.tokens[i, j].tolist()])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
            want = logp[len(prompt) - 1:-1].gather(-1, s.tokens[i, j][:, None]).squeeze(-1)
            torch.testing.assert_close(s.logprobs[i, j], want, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible(model):
    cfg = SamplingConfig(n=3, max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = sample(model, PROMPTS, cfg, eos_id=VOCAB, pad_id=0, generator=torch.Generator().manual_seed(7))
    b = sample(model, PROMPTS, cfg, eos_id=VOCAB, pad_id=0, generator=torch.Generator().manual_seed(7))
    c = sample(model, PROMPTS, cfg, eos_id=VOCAB, pad_id=0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def expected_first_token(model, prompt, temperature, top_k, top_p):
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / temperature
    if top_k:
        z[z < torch.topk(z, top_k).values[-1]] = float("-inf")
    probs = torch.softmax(z, -1)
    if top_p < 1:
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]
        probs[order[before >= top_p]] = 0
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (2.0, 8, 0.9)])
def test_empirical_distribution_matches_softmax(model, temperature, top_k, top_p):
    prompt = [3, 14, 15, 9]
    n = 6000
    s = sample(model, [prompt], SamplingConfig(n=n, max_new_tokens=1, temperature=temperature, top_k=top_k,
                                                top_p=top_p), eos_id=VOCAB, pad_id=0,
               generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(s.tokens[0, :, 0], minlength=VOCAB).double()
    probs = expected_first_token(model, prompt, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0  # nothing outside the top-k / nucleus is ever drawn
    keep = probs > 0
    expected = probs[keep] * n
    # merge rare cells so the chi-square approximation holds (expected count >= 5)
    rare = expected < 5
    obs = torch.cat([counts[keep][~rare], counts[keep][rare].sum()[None]])
    exp = torch.cat([expected[~rare], expected[rare].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_padding_side_does_not_matter(model):
    left = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    left_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]])
    right_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    a, b = prompts_from_padded(left, left_mask), prompts_from_padded(right, right_mask)
    assert a == b == [[5, 6], [7, 8, 9, 10]]
    cfg = SamplingConfig(n=2, max_new_tokens=5, temperature=0)
    assert torch.equal(sample(model, a, cfg, eos_id=VOCAB, pad_id=0).tokens,
                       sample(model, b, cfg, eos_id=VOCAB, pad_id=0).tokens)


def test_restores_training_mode(model):
    model.train()
    sample(model, PROMPTS[:1], SamplingConfig(n=1, max_new_tokens=2), eos_id=VOCAB, pad_id=0)
    assert model.training


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
])
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_refuses_empty_prompts_and_foreign_models(model):
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[1, 2], []], SamplingConfig(n=1, max_new_tokens=2), eos_id=VOCAB, pad_id=0)

    class NotLlama(torch.nn.Module):
        config = model.config

        def get_decoder(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="the sampler drives"):
        check_supported(NotLlama())


def test_compiled_decode_step_matches_eager(model):
    """The torch.compile'd decode step (CUDA graphs on a GPU) gives the eager tokens and log-probs."""
    cfg = SamplingConfig(n=2, max_new_tokens=6, temperature=0.8, top_k=5, top_p=0.9)
    eager = sample(model, PROMPTS[:2], cfg, eos_id=VOCAB, pad_id=0, generator=torch.Generator().manual_seed(0),
                   compile_decode=False)
    compiled = sample(model, PROMPTS[:2], cfg, eos_id=VOCAB, pad_id=0, generator=torch.Generator().manual_seed(0),
                      compile_decode=True)
    assert torch.equal(eager.tokens, compiled.tokens)
    torch.testing.assert_close(eager.logprobs, compiled.logprobs, rtol=1e-4, atol=1e-5)


def test_reused_sampler_keeps_one_compiled_step(model):
    """One Sampler serves batches of different sizes and prompt lengths with one cache and one compiled graph,
    and gives what one-off eager sampling gives."""
    import torch._dynamo

    from bs_train.sampler import Sampler

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # process-global: earlier compiles in this session must not count
    cfg = SamplingConfig(n=2, max_new_tokens=5, temperature=0)
    reused = Sampler(model, cfg, max_prompts=3, prompt_width=9, eos_id=VOCAB, pad_id=0, compile_decode=True)
    batches = [PROMPTS[:3], PROMPTS[3:], [[9, 8, 7, 6, 5, 4, 3, 2, 1]]]
    for batch in batches:
        got = reused(batch)
        want = sample(model, batch, cfg, eos_id=VOCAB, pad_id=0, compile_decode=False)
        assert torch.equal(got.tokens, want.tokens) and got.tokens.shape[0] == len(batch)
    cache = reused._runner.k[0]
    reused(PROMPTS[:2])
    assert reused._runner.k[0] is cache  # the cache is allocated once
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_sampler_refuses_oversized_batches(model):
    from bs_train.sampler import Sampler

    s = Sampler(model, SamplingConfig(n=1, max_new_tokens=2), max_prompts=2, prompt_width=4, eos_id=VOCAB, pad_id=0)
    with pytest.raises(ValueError, match="max_prompts"):
        s(PROMPTS[:3])
    with pytest.raises(ValueError, match="prompt_width"):
        s([list(range(1, 70))])


def test_compiled_step_is_shared_by_samplers_of_other_models_and_reads_their_weights():
    """Evaluation builds a Sampler per model: they share one compiled graph (no recompile per model, so no per-model
    compile time and no fall back to eager at dynamo's recompile limit), and each reads its own weights."""
    import torch._dynamo

    from bs_train.sampler import Sampler

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = SamplingConfig(n=2, max_new_tokens=6, temperature=0)
    outputs = []
    for seed in range(3):
        other = tiny_llama(VOCAB, seed=seed)
        sampler = Sampler(other, cfg, max_prompts=2, prompt_width=9, eos_id=VOCAB, pad_id=0, compile_decode=True)
        got = sampler(PROMPTS[:2])
        want = sample(other, PROMPTS[:2], cfg, eos_id=VOCAB, pad_id=0, compile_decode=False)
        assert torch.equal(got.tokens, want.tokens)
        outputs.append(got.tokens)
    assert not torch.equal(outputs[0], outputs[1])  # different weights, different tokens: nothing was baked in
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def _greedy_round(model, sampler_or_none=None, n_new=8):
    cfg = SamplingConfig(n=1, max_new_tokens=n_new, temperature=0)
    if sampler_or_none is None:
        return sample(model, PROMPTS, cfg, eos_id=VOCAB, pad_id=0).tokens[:, 0]
    return sampler_or_none(PROMPTS).tokens[:, 0]


def test_cpu_plan_reads_the_current_weights_every_round():
    """The CPU plan copies (packs) the weights once per round: a round after a weight update samples from the
    updated model, exactly as HF generate does."""
    from bs_train.decoder import CpuPlan as _CpuPlan
    from bs_train.sampler import Sampler

    m = tiny_llama(VOCAB, seed=5)
    assert _CpuPlan.applies(m)
    s = Sampler(m, SamplingConfig(n=1, max_new_tokens=8, temperature=0), max_prompts=len(PROMPTS), prompt_width=9,
                eos_id=VOCAB, pad_id=0, compile_decode=False)
    before = _greedy_round(m, s)
    assert torch.equal(before, hf_greedy(m, PROMPTS, 8, VOCAB, 0))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    after = _greedy_round(m, s)
    assert not torch.equal(before, after)
    assert torch.equal(after, hf_greedy(m, PROMPTS, 8, VOCAB, 0))


def test_lora_wrapped_projections_are_sampled_with_their_adapters():
    """A LoRA-wrapped projection is not a plain nn.Linear: the sampler runs the wrapper (adapter included) instead
    of packing its base weight, and matches HF generate on the adapted model."""
    peft = pytest.importorskip("peft")
    from bs_train.decoder import CpuPlan as _CpuPlan

    m = peft.get_peft_model(tiny_llama(VOCAB, seed=6), peft.LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    assert not _CpuPlan.applies(m)
    want = hf_greedy(m, PROMPTS, 8, VOCAB, 0)
    assert torch.equal(_greedy_round(m), want)
    with m.disable_adapter():  # the adapters change the output, so the equality above is not vacuous
        assert not torch.equal(hf_greedy(m, PROMPTS, 8, VOCAB, 0), want)


def test_bf16_weights_run_fp32_gemms_where_the_cpu_emulates_bf16():
    """On a CPU without bf16 instructions a bf16 model is sampled with fp32 GEMMs (bs_kernels' rule): its greedy
    tokens are those of the same bf16 weights held in fp32."""
    from bs_kernels.torch_path import gemm_dtype

    if gemm_dtype(torch.bfloat16, torch.device("cpu")) != torch.float32:
        pytest.skip("this CPU runs bf16 GEMMs natively: the plan keeps bf16")
    m16 = tiny_llama(VOCAB, seed=7).to(torch.bfloat16)
    m32 = tiny_llama(VOCAB, seed=7).to(torch.bfloat16).float()
    assert torch.equal(_greedy_round(m16, n_new=10), hf_greedy(m32, PROMPTS, 10, VOCAB, 0))
