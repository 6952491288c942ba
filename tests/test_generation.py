"""pipeline.generation.generate, the sampler behind SFT's samples, `make pairs` and `make eval`: exact where its rule is
exact (greedy decoding, padding, where the response starts, each batch's own seed, the model's mode left as found),
statistical where the rule is a distribution (the temperature), with the tolerance stated."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def llama(tiny_models):
    from pipeline.models import load_base, load_tokenizer, profile_from

    profile = profile_from(str(tiny_models["llama"]))
    tokenizer = load_tokenizer(profile)
    return load_base(profile, tokenizer), tokenizer


def prompt_ids(tokenizer, texts):
    from pipeline.generation import encode_prompts

    return encode_prompts(tokenizer, [[{"role": "user", "content": t}] for t in texts])


@torch.no_grad()
def greedy_by_hand(model, ids: list[int], steps: int, stop: set[int]) -> list[int]:
    """Greedy decoding one prompt at a time, no padding, no cache: the reference."""
    out = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(token)
        if token in stop:
            break
    return out


def test_greedy_responses_start_after_the_prompt_and_prompts_are_left_padded(llama):
    """Temperature 0, one prompt per batch (so the batches have different widths): each response is the hand-rolled
    greedy continuation of its own prompt, from the first new token on, masked up to and including its stop token; each
    prompt sits at the right of its row, padded on the left."""
    from pipeline.generation import SamplingConfig, generate, stop_token_ids

    model, tok = llama
    prompts = prompt_ids(tok, ["Once upon a time", "The rabbit ran into the garden and hid under a leaf.", "Hi"])
    assert len({len(p) for p in prompts}) == 3
    gens = generate(model, tok, prompts, SamplingConfig(max_new_tokens=6, temperature=0, generation_batch_size=1))
    stop = set(stop_token_ids(tok, model))
    width = max(len(p) for p in prompts)
    assert gens.prompt_ids.shape == (3, width) and gens.response_ids.shape == (3, 6)
    for i, p in enumerate(prompts):
        assert gens.prompt_ids[i, width - len(p):].tolist() == p
        assert gens.prompt_mask[i].tolist() == [0] * (width - len(p)) + [1] * len(p)
        expected = greedy_by_hand(model, p, 6, stop)
        n = len(expected)
        assert gens.response_ids[i, :n].tolist() == expected
        assert gens.response_mask[i].tolist() == [1] * n + [0] * (6 - n)
        assert bool(gens.ended[i]) == (expected[-1] in stop)


@pytest.mark.parametrize("temperature", [0.3, 1.5])
def test_samples_follow_the_softmax_at_the_configured_temperature(llama, temperature):
    """2,000 one-token samples of one prompt: their mean log-probability under softmax(logits / T') is highest at the
    configured T among T/2, T and 2T (cross-entropy is smallest where the distributions match; greedy decoding, or a
    temperature lost, would pick another). Tolerance: the margin must exceed 4 standard errors of the difference."""
    from pipeline.generation import SamplingConfig, generate

    model, tok = llama
    p = prompt_ids(tok, ["Once upon a time"])[0]
    n = 2000
    gens = generate(model, tok, [p] * n, SamplingConfig(max_new_tokens=1, temperature=temperature,
                                                         generation_batch_size=n), generator_seed=0)
    tokens = gens.response_ids[:, 0]
    with torch.no_grad():
        logits = model(torch.tensor([p])).logits[0, -1].float()
    loglik = {t: torch.log_softmax(logits / t, -1)[tokens] for t in (temperature / 2, temperature, 2 * temperature)}
    for other in (temperature / 2, 2 * temperature):
        diff = loglik[temperature] - loglik[other]
        assert diff.mean() > 4 * diff.std() / n ** 0.5, (temperature, other, float(diff.mean()), float(diff.std()))


def test_samples_stay_in_the_configured_top_k_and_nucleus(llama):
    """2,000 one-token samples of one prompt with top_k=3, then with top_p set between the 3rd and 4th cumulative
    probability of softmax(logits / T) (HF's order: temperature first): the tokens drawn are exactly the 3 most
    probable ones, no other (a top_k or top_p not passed to generate() would draw from the whole vocabulary, where
    this prompt leaves most of the mass outside those 3), and each of the 3 is drawn."""
    from pipeline.generation import SamplingConfig, generate

    model, tok = llama
    p = prompt_ids(tok, ["Once upon a time"])[0]
    temperature, n = 0.9, 2000
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([p])).logits[0, -1].float() / temperature, -1)
    top, order = probs.sort(descending=True)
    cum = top.cumsum(0)
    assert float(cum[2]) < 0.5 and float(top[2] / cum[2]) > 0.05, top[:4]  # teeth: most mass outside; each of 3 drawn
    three = set(order[:3].tolist())
    for top_k, top_p in ((3, 1.0), (0, float(cum[1] + cum[2]) / 2)):
        cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, generation_batch_size=n)
        drawn = set(generate(model, tok, [p] * n, cfg, generator_seed=0).response_ids[:, 0].tolist())
        assert drawn == three, (top_k, top_p, sorted(drawn - three), sorted(three - drawn))


def test_each_batch_samples_from_its_own_seed(llama):
    """Four copies of one prompt in batches of two: the second batch does not repeat the first, and equals what the
    second batch's own seed gives alone (so a batch's tokens do not depend on which rank runs it)."""
    from pipeline.generation import SamplingConfig, batch_seed, generate

    model, tok = llama
    p = prompt_ids(tok, ["Once upon a time"])[0]
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, generation_batch_size=2)
    four = generate(model, tok, [p] * 4, cfg, generator_seed=5)
    second = generate(model, tok, [p] * 2, cfg, generator_seed=batch_seed(5, 1))
    assert batch_seed(5, 0) == 5 and batch_seed(5, 1) != 5
    assert four.response_ids[2:].tolist() != four.response_ids[:2].tolist()
    assert four.response_ids[2:].tolist() == second.response_ids.tolist()
    assert generate(model, tok, [p] * 4, cfg, generator_seed=5).texts == four.texts  # seeded: repeatable


def test_no_random_stream_of_one_seed_is_a_stream_of_another():
    """A run's streams (sampling batches, PPO's passes over the prompts, ensemble members) are seeded stream_seed(seed,
    i): stream 0 is the seed itself, and the first ten streams of seeds 0-99 are 1000 distinct seeds (seed + i would
    give 109: seed 1's stream 1 would be seed 2's stream 0)."""
    from pipeline.config import stream_seed

    assert stream_seed(5, 0) == 5 and stream_seed(5, 2) == 5 + 2 * 1_000_003
    assert len({stream_seed(seed, i) for seed in range(100) for i in range(10)}) == 1000


@pytest.mark.parametrize("training", [True, False])
def test_the_model_is_left_in_the_mode_it_was_found_in(llama, training):
    """SFT samples before and after training: generate() switches to eval mode (no dropout) and must switch back."""
    from pipeline.generation import SamplingConfig, generate

    model, tok = llama
    model.train(training)
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        generate(model, tok, prompt_ids(tok, ["Hi"]), SamplingConfig(max_new_tokens=2, temperature=0))
    finally:
        hook.remove()
    assert modes and not any(modes)  # every forward of the sampling without dropout
    assert model.training is training
    model.eval()


def test_a_long_prompt_keeps_its_end_and_padding_goes_on_the_left(llama):
    """encode_prompts cuts a prompt to its last max_prompt_tokens ids (the assistant header and the latest turn),
    keeping a leading BOS; left_pad puts each sequence at the right of its row, masked exactly there."""
    from pipeline.generation import encode_prompts, left_pad

    _, tok = llama
    full = prompt_ids(tok, ["The rabbit ran into the garden and hid under a leaf."])[0]
    assert full[0] == tok.bos_token_id and len(full) > 5
    assert encode_prompts(tok, [[{"role": "user", "content": "The rabbit ran into the garden and hid under a leaf."}]],
                          max_prompt_tokens=5) == [[tok.bos_token_id] + full[-4:]]
    ids, mask = left_pad([[7, 8, 9], [5], []], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_a_checkpoints_own_sampling_defaults_are_not_applied(tiny_models, tmp_path):
    """A checkpoint whose generation_config.json asks for a repetition penalty and no repeated token (as instruct
    checkpoints ship sampling defaults): the pipeline's greedy decoding still is the plain argmax of the logits, token
    for token, as PPO's sampler and the KL figures assume. Its EOS ids are kept."""
    import json
    import shutil

    import yaml

    from transformers import AutoModelForCausalLM

    from pipeline.generation import SamplingConfig, generate, stop_token_ids
    from pipeline.models import load_base, load_tokenizer, profile_from

    spec = yaml.safe_load(open(tiny_models["llama"]))
    folder = tmp_path / "llama-with-defaults"
    shutil.copytree(spec["name_or_path"], folder)
    config = json.loads((folder / "generation_config.json").read_text()) if (folder / "generation_config.json").is_file() else {}
    eos = config.get("eos_token_id", 2)
    config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, eos_token_id=[eos, 7])
    (folder / "generation_config.json").write_text(json.dumps(config))
    profile_path = tmp_path / "profile.yaml"
    profile_path.write_text(yaml.safe_dump({**spec, "name_or_path": str(folder)}))
    profile = profile_from(str(profile_path))
    tok = load_tokenizer(profile)
    model = load_base(profile, tok)
    assert 7 in stop_token_ids(tok, model)
    stop = set(stop_token_ids(tok, model))
    prompts = prompt_ids(tok, ["Once upon a time", "The rabbit ran"])
    sampling = SamplingConfig(max_new_tokens=40, temperature=0, generation_batch_size=1)
    gens = generate(model, tok, prompts, sampling)
    by_hand = [greedy_by_hand(model, p, 40, stop) for p in prompts]
    for i, expected in enumerate(by_hand):
        assert gens.response_ids[i, :len(expected)].tolist() == expected
    # the same weights with the checkpoint's defaults in force decode otherwise: the check above has teeth
    with_defaults = AutoModelForCausalLM.from_pretrained(folder)
    with_defaults.generation_config.pad_token_id = tok.pad_token_id
    assert generate(with_defaults, tok, prompts, sampling).response_ids.tolist() != gens.response_ids.tolist()


def test_reply_texts_leave_out_the_stop_token_in_rollouts_and_eval_alike(llama):
    """The text a reward model or judge reads, from PPO's rollouts (stages/ppo/rollout.collect) and from eval's and
    pairs' samples (generate), is the reply's words: an EOS kept in it would be scored as text ("...day.</s>") in
    training and not in eval. Mutant: skip_special_tokens off."""
    from pipeline.generation import response_texts

    _, tok = llama
    words = tok.encode("It was a sunny day.", add_special_tokens=False)
    ids = torch.tensor([words + [tok.eos_token_id, tok.pad_token_id], words + words[:2]])
    mask = torch.tensor([[1] * (len(words) + 1) + [0], [1] * (len(words) + 2)])
    assert tok.eos_token and tok.decode([tok.eos_token_id]) == tok.eos_token
    assert response_texts(tok, ids, mask) == [tok.decode(words).strip(), tok.decode(words + words[:2]).strip()]


def test_reply_texts_are_the_words_without_the_whitespace_around_them(llama):
    """A reply sampled as " It was a sunny day.\n" is read as "It was a sunny day." by the reward model, the gold
    judge and the same-reply tie rule alike (the chat template puts the reply right after its header): the space
    and newline a policy emits around its words are not part of the reply. Mutant: the strip dropped."""
    from pipeline.generation import response_texts

    _, tok = llama
    words = tok.encode(" It was a sunny day.\n", add_special_tokens=False)
    assert tok.decode(words) == " It was a sunny day.\n"  # the whitespace really is in the sampled tokens
    ids = torch.tensor([words + [tok.eos_token_id]])
    assert response_texts(tok, ids, torch.ones_like(ids)) == ["It was a sunny day."]


def test_a_checkpoints_sampling_defaults_do_not_reach_the_samplers(tiny_models, tmp_path):
    """Every sampler here draws from softmax(logits / T) with the stage's own top_p / top_k, as PPO's sampler does and
    the KL figures assume. A checkpoint's generation_config.json that sets Qwen's repetition_penalty 1.1, a
    no_repeat_ngram_size or min_new_tokens would apply to pairs and eval silently (generate() fills every field it is
    not given from it): load_base keeps only its special tokens, the pad id the tokenizer's. Mutant: the checkpoint's
    generation_config kept as loaded."""
    import json
    import shutil

    import yaml

    from pipeline.models import load_base, load_tokenizer, profile_from

    spec = yaml.safe_load(open(tiny_models["llama"]))
    folder = shutil.copytree(spec["name_or_path"], tmp_path / "base")
    loaded = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(
        {**loaded, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3, "min_new_tokens": 5, "top_k": 20,
         "pad_token_id": 7 if loaded.get("pad_token_id") != 7 else 8}))  # another pad than the tokenizer's
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump({**spec, "name_or_path": str(folder)}))
    profile = profile_from(str(tmp_path / "profile.yaml"))
    tok = load_tokenizer(profile)
    config = load_base(profile, tok).generation_config
    # none set: generate() takes its own defaults, and the samplers their own temperature, top_p and top_k
    assert (config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens, config.top_k) == (None,) * 4
    assert (config.bos_token_id, config.eos_token_id) == (loaded["bos_token_id"], loaded["eos_token_id"])
    assert config.pad_token_id == tok.pad_token_id not in (7, 8)


@pytest.mark.parametrize("mixed, dtype", [("no", None), ("", None), ("NO", None), ("bf16", torch.bfloat16),
                                          ("BF16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_launchs_mixed_precision_is_the_autocast_of_forwards_outside_a_trainer(mixed, dtype, monkeypatch):
    """`accelerate launch` passes the config's mixed_precision on as ACCELERATE_MIXED_PRECISION: "no" or unset (an
    empty value included) is no autocast, bf16 and fp16 their dtype's. Mutant: an empty value taken for a setting,
    refused as an unknown mixed precision."""
    from contextlib import nullcontext

    from pipeline.models import launch_autocast

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mixed)
    context = launch_autocast(torch.device("cpu"), "pairs")
    if dtype is None:
        assert isinstance(context, nullcontext)
    else:
        assert isinstance(context, torch.autocast) and context.fast_dtype == dtype
