"""Real checkpoints' chat templates: SFT trains on the assistant's tokens only (each reply and its end-of-turn token),
whatever the template; every stop token ends a response in SFT samples, pairs and eval.

The templates are the checkpoints' own files (TRL ships them in trl/chat_templates/), on tokenizers trained here
with each family's special tokens (tests/conftest.py REAL_TEMPLATES): no Hub access.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import (LLAMA_TARGETS, REAL_TEMPLATES, REPO, build_template_tokenizer, template_text,
                            tiny_tokenizer_with)

SYSTEM, REPLIES = "Be brief.", ["Hello, little rabbit.", "Yes: two lines,\nand a carrot."]


def conversation(name: str) -> list[dict]:
    """Two user/assistant rounds, with a system turn where the template takes one (Gemma 1/2 refuse it)."""
    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": REPLIES[0]},
             {"role": "user", "content": "More?"}, {"role": "assistant", "content": REPLIES[1]}]
    return turns if name == "gemma" else [{"role": "system", "content": SYSTEM}, *turns]


def expected_assistant_text(name: str) -> list[str]:
    eot = REAL_TEMPLATES[name]["end_of_turn"]
    # Qwen3's template itself opens the final assistant turn (after the last user message) with an empty think block:
    # that block is the start of what the model must write there, so it is trained with the reply.
    last_prefix = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
    return [REPLIES[0] + eot, last_prefix + REPLIES[1] + eot]


def runs_of(ids: torch.Tensor, keep: torch.Tensor) -> list[list[int]]:
    out, cur = [], []
    for i, k in zip(ids.tolist(), keep.tolist()):
        if k:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + [cur] if cur else out


def tiny_llama(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(cfg)


def sft_collated(tok, rows: list[dict], tmp_path, assistant_only_loss: bool = True, ours: bool = True):
    """What the SFT stage hands TRL (stages.sft.split_and_tokenize), collated by TRL's own SFTTrainer. ours=False:
    the raw conversations, as TRL alone would take them."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.sft import SFTArgs, split_and_tokenize

    cfg = SFTConfig(output_dir=str(tmp_path / "o"), assistant_only_loss=assistant_only_loss, max_length=512, bf16=False,
                    report_to="none", save_strategy="no")
    train = Dataset.from_list(rows)
    if ours:
        train, _ = split_and_tokenize(train, tok, cfg, SFTArgs(eval_fraction=0.0), "test rows")
    trainer = SFTTrainer(model=tiny_llama(tok), args=cfg, train_dataset=train, processing_class=tok)
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])


@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
def test_sft_trains_exactly_each_reply_and_its_end_of_turn(name, template_tokenizers, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.models import load_tokenizer, profile_from

    profile = tmp_path / "p.yaml"
    profile.write_text(f"name_or_path: {template_tokenizers[name]}\n")
    tok = load_tokenizer(profile_from(str(profile)))  # pad = eos where the family has no pad (Llama 3)
    messages = conversation(name)
    batch = sft_collated(tok, [{"messages": messages}], tmp_path)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = [tok.decode(run) for run in runs_of(ids, labels != -100)]
    assert trained == expected_assistant_text(name)
    # The sequence itself is the template's, token for token: only the mask is ours.
    assert ids[batch["attention_mask"][0].bool()].tolist() == list(
        AutoTokenizer.from_pretrained(template_tokenizers[name]).apply_chat_template(
            messages, tokenize=True, return_dict=True, date_string="26 Jul 2024")["input_ids"])  # TEMPLATE_KWARGS


def test_mask_equals_trls_on_a_template_with_generation_markers(tiny_models, tmp_path):
    """The pipeline's own template has {% generation %} markers, which TRL reads itself: on the bundled multi-turn
    rows our mask gives TRL's labels exactly (so `make bench-sft` compares like with like)."""
    from pipeline.models import load_tokenizer, profile_from

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    rows = [json.loads(line) for line in open(REPO / "data/sft/oasst.jsonl")]
    rows = [r for r in rows if len(r["messages"]) >= 4][:6] + rows[:2]
    ours, trls = sft_collated(tok, rows, tmp_path), sft_collated(tok, rows, tmp_path / "trl", ours=False)
    assert torch.equal(ours["input_ids"], trls["input_ids"]) and torch.equal(ours["labels"], trls["labels"])
    assert (ours["labels"] != -100).sum() > 100


def test_full_sequence_loss_when_assistant_only_loss_is_off(template_tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(template_tokenizers["qwen2_5"])
    batch = sft_collated(tok, [{"messages": conversation("qwen2_5")}], tmp_path, assistant_only_loss=False)
    assert torch.equal(batch["labels"][0], batch["input_ids"][0])


@pytest.mark.parametrize("name", ["llama3_2", "smollm2_chatml"])
def test_sft_main_runs_on_templates_trl_cannot_patch(name, template_models, runs_dir):
    """TRL 1.16 refuses both ("not training-compatible ... patching is not supported"): Llama 3.2's template, and
    SmolLM2's ChatML with pad == eos."""
    from stages.sft import main, parse_args
    from tests.test_sft import tiny_args

    metrics = main(*parse_args(tiny_args(template_models[name], runs_dir, name, "--max_steps", "8")))
    curve = metrics["loss_curve"]
    assert len(curve) == 8 and all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0], curve
    assert (runs_dir / name / "sft" / "manifest.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(runs_dir / name / "sft" / "adapter").chat_template == template_text(name)


# ---------------------------------------------------------------------------------------------------- stop tokens

@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
def test_stop_ids_are_eos_generation_config_and_end_of_turn(name, template_tokenizers):
    from transformers import AutoTokenizer, GenerationConfig

    from pipeline.chat import end_of_turn
    from pipeline.generation import stop_token_ids

    spec, tok = REAL_TEMPLATES[name], AutoTokenizer.from_pretrained(template_tokenizers[name])
    assert end_of_turn(tok) == spec["end_of_turn"]
    listed = tok.convert_tokens_to_ids(spec["stop"])
    expected = {tok.eos_token_id, *listed, tok.convert_tokens_to_ids(spec["end_of_turn"])}
    assert sorted(stop_token_ids(tok, GenerationConfig(eos_token_id=listed))) == sorted(expected)
    # No generation config: the tokenizer's EOS and the template's end-of-turn token (Gemma: <eos> and <end_of_turn>)
    assert sorted(stop_token_ids(tok)) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids(spec["end_of_turn"])})


def test_end_of_turn_of_the_pipelines_own_template(tiny_models):
    from pipeline.chat import end_of_turn
    from pipeline.generation import stop_token_ids
    from pipeline.models import load_tokenizer, profile_from

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    assert end_of_turn(tok) == "</s>" and stop_token_ids(tok) == [tok.eos_token_id]


def test_an_end_of_turn_that_is_an_ordinary_token_does_not_stop_generation(tiny_models):
    """A template that closes each turn with '.' (one ordinary token): stopping at it would cut every reply at its
    first full stop, so only special tokens join the stop ids."""
    from pipeline.chat import end_of_turn
    from pipeline.generation import stop_token_ids
    from pipeline.models import load_tokenizer, profile_from

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}.\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    dot = tok(".", add_special_tokens=False)["input_ids"]
    assert end_of_turn(tok) == "." and len(dot) == 1 and dot[0] not in tok.all_special_ids
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_an_end_of_turn_added_as_a_special_token_stops_generation_and_one_of_two_tokens_does_not():
    """The template's end of turn joins the stop ids when it is one special token by either record: among the
    tokenizer's special ids, or an added token marked special that is not listed there (the way some tokenizers carry
    their end-of-turn token). An end of turn of two tokens is no stop token, even when its first one is special."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from pipeline.chat import end_of_turn
    from pipeline.generation import stop_token_ids

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")
    assert tok.add_tokens([AddedToken("<|end|>", special=True)]) == 1
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end not in tok.all_special_ids and tok.added_tokens_decoder[end].special
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tok.chat_template = template
    assert end_of_turn(tok) == "<|end|>" and stop_token_ids(tok) == [tok.eos_token_id, end]
    tok.chat_template = template.replace("<|end|>", "<|end|>!")
    assert end_of_turn(tok) == "<|end|>!" and tok("<|end|>!", add_special_tokens=False)["input_ids"][0] == end
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_truncate_after_the_first_of_several_stop_ids():
    from pipeline.generation import truncate_after_eos

    responses = torch.tensor([[5, 7, 9, 3, 2], [5, 2, 9, 9, 9], [5, 6, 6, 6, 6]])
    ids, mask, ended = truncate_after_eos(responses, [2, 9], pad_id=0)
    assert ids.tolist() == [[5, 7, 9, 0, 0], [5, 2, 0, 0, 0], [5, 6, 6, 6, 6]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]] and ended.tolist() == [True, True, False]
    ids, mask, ended = truncate_after_eos(responses, 2, pad_id=0)  # one id still works
    assert ended.tolist() == [True, True, False] and mask[0].tolist() == [1, 1, 1, 1, 1]


def stopper_model(tokenizer_dir, out, stop_token: str, generation_eos: list[str]):
    """A tiny Llama that writes `stop_token` at every step: the last MLP's bias pushes the residual stream along one
    direction, and only that token's output row reads it. generation_config lists `generation_eos`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, mlp_bias=True,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.bias.zero_()[0] = 1000.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.convert_tokens_to_ids(stop_token), 0] = 10.0
    model.generation_config = GenerationConfig(eos_token_id=tok.convert_tokens_to_ids(generation_eos), pad_token_id=pad)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    profile = out.parent / f"{out.name}.yaml"
    profile.write_text(f"name_or_path: {out}\nlora_target_modules: {LLAMA_TARGETS}\n")
    return profile


@pytest.fixture(scope="module")
def stoppers(tmp_path_factory):
    """Llama 3 writing <|eom_id|> (its tokenizer's EOS is <|eot_id|>; generation_config lists all three), and Gemma
    writing <end_of_turn> (EOS <eos>, generation_config lists only <eos>: the template tells the rest)."""
    root = tmp_path_factory.mktemp("stoppers")
    llama = build_template_tokenizer("llama3_2", root / "tok_llama")
    gemma = build_template_tokenizer("gemma", root / "tok_gemma")
    return {"llama3_2": stopper_model(llama, root / "llama3_2", "<|eom_id|>", REAL_TEMPLATES["llama3_2"]["stop"]),
            "gemma": stopper_model(gemma, root / "gemma", "<end_of_turn>", ["<eos>"])}


@pytest.mark.parametrize("name", ["llama3_2", "gemma"])
def test_generate_stops_at_a_stop_id_that_is_not_the_tokenizers_eos(name, stoppers):
    from pipeline.generation import SamplingConfig, encode_prompts, generate
    from pipeline.models import load_base, load_tokenizer, profile_from

    profile = profile_from(str(stoppers[name]))
    tok = load_tokenizer(profile)
    model = load_base(profile, tok)
    prompts = encode_prompts(tok, [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Tell me more."}]])
    gens = generate(model, tok, prompts, SamplingConfig(max_new_tokens=6, temperature=0.7), generator_seed=0)
    stop = tok.convert_tokens_to_ids({"llama3_2": "<|eom_id|>", "gemma": "<end_of_turn>"}[name])
    assert stop != tok.eos_token_id
    assert gens.ended.tolist() == [True, True] and gens.response_mask.tolist() == [[1, 0, 0, 0, 0, 0]] * 2
    assert gens.response_ids[:, 0].tolist() == [stop, stop] and gens.texts == ["", ""]


def test_pairs_and_eval_count_a_response_ended_by_the_end_of_turn_token(stoppers, runs_dir, tmp_path):
    import datasets

    from pipeline.config import RunArgs, parse
    from pipeline.generation import SamplingConfig
    from stages.eval import main as eval_main, parse_args as eval_args
    from stages.pairs import PairsArgs, main as pairs_main
    from tests.fake_upstream import build_upstream
    from tests.test_pairs import make_sft_run

    profile = str(stoppers["gemma"])
    make_sft_run(runs_dir, "g", profile)
    pairs_main(*parse((PairsArgs, SamplingConfig, RunArgs), [
        "--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "g", "--model_config", profile,
        "--max_prompts", "3", "--max_new_tokens", "6", "--drop_identical", "false", "--num_responses", "2",
        "--max_prompt_tokens", "256"]))  # story prompts run long under the test tokenizer (as in test_pairs.py)
    ds = datasets.load_from_disk(str(runs_dir / "g/pairs/dataset"))
    assert len(ds) == 3 and all(e == [True, True] for e in ds["ended"])

    runs = build_upstream(tmp_path / "runs", stoppers["gemma"])
    m = eval_main(*eval_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                              "--model_config", profile, "--max_new_tokens", "6"]))
    assert m["no_eos_sft"] == 0.0 and m["no_eos_ppo"] == 0.0 and m["length_sft_mean"] == m["length_ppo_mean"] == 1.0


def test_an_end_of_turn_the_tokenizer_cannot_stop_at_is_refused():
    """A TRL template on a tokenizer without its special tokens (GPT-2 or Pythia given qwen2_5.jinja): '<|im_end|>' is
    ordinary tokens, none of them a stop, so SFT would teach a model to write it and carry on to the token cap. The
    same tokenizer with a template that closes turns with its EOS, and the real Qwen tokenizer, are accepted."""
    from transformers import AutoTokenizer

    from pipeline.chat import require_end_of_turn
    from pipeline.config import ConfigError

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")  # EOS '</s>'; no '<|im_end|>' among its tokens
    assert require_end_of_turn(tok) == "</s>"
    chatml = template_text("qwen2_5")
    tok.chat_template = chatml
    with pytest.raises(ConfigError, match=r"ends assistant turns with '<\|im_end\|>', which this tokenizer writes as "
                                          r"\d+ token\(s\) ending in no stop token \(stops: '</s>'\)"):
        require_end_of_turn(tok)
    tok.chat_template = chatml.replace("<|im_end|>", "</s>")  # turns closed by the EOS itself
    assert require_end_of_turn(tok) == "</s>"


def test_a_template_that_is_not_valid_jinja_is_named_as_such():
    """A typo in a profile's template text (an unclosed `{{ ... }`) was reported as a template that "closes assistant
    turns with no end-of-turn text": the probe's TemplateSyntaxError was taken for a template that writes none."""
    from transformers import AutoTokenizer

    from pipeline.chat import require_end_of_turn
    from pipeline.config import ConfigError

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")
    tok.chat_template = "{% for m in messages %}{{ m.content }{% endfor %}"
    with pytest.raises(ConfigError, match=r"the chat template is not valid Jinja: .* \(line 1 of the template\)"):
        require_end_of_turn(tok)
    # valid Jinja that refuses the probe's lone user turn (raise_exception): one error line as before, no traceback
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate system/user/assistant') }}"
    with pytest.raises(ConfigError, match="closes assistant turns with no end-of-turn text"):
        require_end_of_turn(tok)


# Mistral-7B-Instruct-v0.1's template: no assistant header, so no generation prompt either
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == "
                    "0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
                    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("case", ["reorders_earlier_turns", "no_end_of_turn", "no_generation_prompt", "no_header_at_all",
                                  "starts_with_an_assistant_turn"])
def test_templates_sft_cannot_mask_are_refused_clearly(case, template_tokenizers):
    from transformers import AutoTokenizer

    from pipeline.chat import require_end_of_turn, tokenize_with_assistant_mask
    from pipeline.config import ConfigError

    tok = AutoTokenizer.from_pretrained(template_tokenizers["qwen2_5"])
    turn = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    if case == "reorders_earlier_turns":  # the header counts the turns: earlier renders are not prefixes of later ones
        tok.chat_template = "turns: {{ messages|length }}\n" + turn + "<|im_end|>\n{% endfor %}" \
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        with pytest.raises(ConfigError, match="renders the conversation before assistant turn 1 differently"):
            tokenize_with_assistant_mask(tok, conversation("qwen2_5")[1:], "<|im_end|>")
    elif case == "starts_with_an_assistant_turn":  # nothing before it to render as its prompt (transformers refuses
        # an empty conversation with a bare ValueError): one ConfigError, from the SFT stage's own tokenizing
        from datasets import Dataset

        from stages.sft import with_assistant_masks

        rows = Dataset.from_list([{"messages": conversation("qwen2_5")[1:]},
                                  {"messages": conversation("qwen2_5")[2:]}])  # the second row opens with a reply
        with pytest.raises(ConfigError, match="^row 2 of rows.jsonl: a conversation starts with an assistant turn: "
                                              "give each assistant turn"):
            with_assistant_masks(rows, tok, "<|im_end|>", "rows.jsonl")
    elif case == "no_generation_prompt":  # ChatML without its generation prompt: SFT would train the header as reply
        tok.chat_template = turn + "<|im_end|>\n{% endfor %}"
        with pytest.raises(ConfigError, match="adds nothing for add_generation_prompt=True but writes an assistant header"):
            require_end_of_turn(tok)
    elif case == "no_header_at_all":  # Mistral-Instruct's and Llama 2's: the reply follows `[/INST]` at once, so the
        # prompt does end where the reply starts (refused as "no generation prompt" before); SFT trains reply + EOS
        from pipeline.chat import tokenize_with_assistant_mask

        tok = AutoTokenizer.from_pretrained(template_tokenizers["llama3_2"])
        tok.chat_template = MISTRAL_TEMPLATE
        assert require_end_of_turn(tok) == tok.eos_token
        conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello you"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ok"}]
        enc = tokenize_with_assistant_mask(tok, conv, tok.eos_token)
        trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
        assert tok.decode(trained) == f"Hello you{tok.eos_token}Ok{tok.eos_token}"
    else:  # turns run together with nothing that closes them: a model trained on it could not learn to stop
        tok.chat_template = turn + "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        with pytest.raises(ConfigError, match="closes assistant turns with no end-of-turn text"):
            require_end_of_turn(tok)


def test_llama3_renders_carry_a_fixed_date_not_the_clocks(template_tokenizers, tmp_path):
    """Llama 3.2's template writes "Today Date:" from the clock unless given date_string: the same conversation was
    other tokens on another day (a reward model trained one day scored another day's prompts). Every render the
    pipeline makes (chat.render, chat_ids for sampling and scoring, the reward model's and DPO's pairs, TRL's own
    SFT rendering through the rows' chat_template_kwargs) gets the template's own fallback date."""
    from transformers import AutoTokenizer

    from pipeline.chat import render
    from pipeline.generation import chat_ids
    from stages.rm_data import encode_pair

    tok = AutoTokenizer.from_pretrained(template_tokenizers["llama3_2"])
    user = [{"role": "user", "content": "Hi"}]
    fixed = "Today Date: 26 Jul 2024"
    assert fixed in tok.apply_chat_template(user, tokenize=False, date_string="26 Jul 2024")
    assert fixed not in tok.apply_chat_template(user, tokenize=False)  # the clock's date, without the fix
    assert fixed in render(tok, user, add_generation_prompt=True)
    assert fixed in tok.decode(chat_ids(tok, user, add_generation_prompt=True))
    chosen, rejected = encode_pair(tok, {"prompt": user, "chosen": [{"role": "assistant", "content": "Hello"}],
                                         "rejected": [{"role": "assistant", "content": "Go"}]})
    assert fixed in tok.decode(chosen) and fixed in tok.decode(rejected)
    for only_replies in (True, False):  # our own tokenization, or TRL's (the rows carry the kwargs)
        batch = sft_collated(tok, [{"messages": user + [{"role": "assistant", "content": "Hello"}]}],
                             tmp_path / str(only_replies), assistant_only_loss=only_replies)
        assert fixed in tok.decode(batch["input_ids"][0]), only_replies


def test_a_base_without_a_pad_token_pads_with_eos_and_its_reward_model_reads_there(tmp_path):
    """Llama-3 ships no pad token and no pad_token_id in its config: the tokenizer pads with EOS (TRL's convention), and
    the model loaded as a reward model gets that id as pad_token_id, so transformers reads the score at the last token
    before the padding, not at position 0 or the last pad."""
    import yaml

    from pipeline.models import load_base, load_tokenizer, profile_from
    from tests.conftest import build_template_model

    tok_dir = build_template_tokenizer("llama3", tmp_path / "tok")
    model_dir = build_template_model("llama3", tok_dir, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    profile = tmp_path / "llama3.yaml"
    profile.write_text(yaml.safe_dump({"name_or_path": str(model_dir), "lora_target_modules": LLAMA_TARGETS}))
    prof = profile_from(str(profile))
    tok = load_tokenizer(prof)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.pad_token == tok.eos_token == "<|eot_id|>" and tok.pad_token_id == eot != tok.bos_token_id
    model = load_base(prof, tok, kind="score")
    assert model.config.pad_token_id == eot
    causal = load_base(prof, tok)  # the sampler pads with it too
    assert causal.config.pad_token_id == causal.generation_config.pad_token_id == eot
    ids = torch.tensor([[5, 6, 7, eot, eot], [5, 6, eot, eot, eot]])
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 0]
        per_token = model.score(model.model(input_ids=ids).last_hidden_state)[..., 0]
    torch.testing.assert_close(scores, torch.stack([per_token[0, 2], per_token[1, 1]]))


def test_a_base_with_its_own_pad_token_keeps_it(tiny_models):
    """Only a tokenizer without a pad token pads with EOS: one with its own (the pipeline's `<pad>`) keeps it, and the
    reward model reads its score at the final EOS, as RewardTrainer trained it to. Mutant: EOS made the pad of every
    tokenizer, and the score moved to the token before the EOS."""
    from pipeline.models import load_base, load_tokenizer, profile_from

    prof = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(prof)
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "</s>") and tok.pad_token_id != tok.eos_token_id
    assert load_base(prof, tok, kind="score").config.pad_token_id == tok.convert_tokens_to_ids("<pad>")


STORY_LENGTHS = {"llama3_1": (109, 138), "llama3_2": (109, 138), "qwen2_5": (91, 121), "qwen3": (59, 95),
                 "gemma3": (60, 90), "phi3_5": (54, 85)}  # longest opening with its generation prompt, longest SFT row


@pytest.mark.parametrize("name", list(STORY_LENGTHS))
def test_every_story_row_fits_the_story_configs_under_real_templates(name, tmp_path):
    """A real checkpoint's template adds its system prompt (Llama 3.x: the knowledge and today's dates; Qwen2.5: "You
    are Qwen..."). The story configs' limits keep every opening and SFT row whole under each family's template: at the
    old 64, `make pairs` and PPO left out every opening under Llama 3.x and 91% under Qwen2.5, and SFT's 128 cut the
    end-of-turn token off 669 of Llama 3.x's 4,000 rows."""
    from pipeline.chat import require_end_of_turn, tokenize_with_assistant_mask
    from pipeline.config import read_yaml
    from pipeline.generation import encode_prompts

    tok = tiny_tokenizer_with(name, tmp_path)
    story = REPO / "data" / "story"
    openings = [json.loads(line)["prompt"] for f in ("pairs_prompts.jsonl", "ppo_prompts.jsonl")
                for line in (story / f).read_text().splitlines()]
    rows = [json.loads(line)["messages"] for line in (story / "sft.jsonl").read_text().splitlines()]
    longest_prompt = max(map(len, encode_prompts(tok, openings)))
    eot = require_end_of_turn(tok)
    longest_row = max(len(tokenize_with_assistant_mask(tok, m, eot)["input_ids"]) for m in rows)
    assert (longest_prompt, longest_row) == STORY_LENGTHS[name]
    cfg = {stage: read_yaml(REPO / "configs" / f"{stage}.yaml") for stage in ("sft", "pairs", "ppo", "rm", "dpo")}
    assert longest_prompt <= cfg["pairs"]["max_prompt_tokens"] and longest_prompt <= cfg["ppo"]["max_prompt_length"]
    assert longest_row <= cfg["sft"]["max_length"]
    # a pair: the longest prompt pairs keeps, a reply of max_new_tokens, its end-of-turn token and the template's tail
    pair = cfg["pairs"]["max_prompt_tokens"] + cfg["pairs"]["max_new_tokens"] + 2
    assert pair <= cfg["rm"]["max_length"] and pair <= cfg["dpo"]["max_length"]


@pytest.mark.parametrize("name", ["llama3_2", "qwen2_5", "gemma3"])
def test_the_assistant_recipe_keeps_its_prompts_under_real_templates(name, tmp_path):
    """The assistant recipe is the one for real checkpoints. Its PPO prompt limit was 64 tokens, which kept 1 of its 125
    prompts under Llama 3.x's template (the tiny tokenizer's count) and 45 under Qwen2.5's: PPO trained on almost
    nothing, with a note. Now PPO and pairs keep all but at most 1 of each prompt set."""
    from pipeline.config import read_yaml
    from pipeline.generation import encode_prompts

    tok = tiny_tokenizer_with(name, tmp_path)
    recipe = REPO / "configs" / "recipes" / "assistant"
    for stage, key in (("ppo", "max_prompt_length"), ("pairs", "max_prompt_tokens")):
        cfg = read_yaml(recipe / f"{stage}.yaml")
        rows = [json.loads(line)["prompt"] for line in (REPO / cfg["prompts_file"]).read_text().splitlines()]
        prompts = [r if isinstance(r, list) else [{"role": "user", "content": r}] for r in rows]
        left_out = sum(len(ids) > cfg[key] for ids in encode_prompts(tok, prompts))
        assert left_out <= 1, (stage, left_out, len(prompts))


def test_a_reply_that_writes_the_end_of_turn_text_is_masked_to_its_own_end():
    """The end-of-turn text is searched for after the reply, not inside it: a reply that itself writes "</s>" (the
    embedded base's end of turn) is masked to its end, its own "</s>" and the template's after it; and a template
    whose turns do not end with the end-of-turn text given is one error, not a turn silently left unmasked."""
    from transformers import AutoTokenizer

    from pipeline.chat import assistant_spans, render, tokenize_with_assistant_mask
    from pipeline.config import ConfigError

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")
    messages = [{"role": "user", "content": "How do I end a turn?"}, {"role": "assistant", "content": "Write </s> and stop."}]
    text = render(tok, messages)
    start = len(render(tok, messages[:1], add_generation_prompt=True))
    reply_end = text.index("Write </s> and stop.") + len("Write </s> and stop.")
    assert assistant_spans(tok, messages, text, "</s>") == [(start, text.index("</s>", reply_end) + len("</s>"))]
    enc = tokenize_with_assistant_mask(tok, messages, "</s>")
    words = [tok.decode([t]) for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert "".join(words).strip().startswith("Write") and "".join(words).rstrip().endswith("stop.</s>")
    with pytest.raises(ConfigError, match="assistant turn 1 does not end with the template's end-of-turn text '<|nope|>'"):
        assistant_spans(tok, messages, text, "<|nope|>")


def test_a_reply_its_prompt_already_holds_is_masked_in_its_own_turn():
    """The reply is looked for from its own turn's start: a short reply the user's question already holds ("yes" in
    "Answer yes or no") was found there, its end-of-turn searched from the question's, and the turn's span ended
    before it began: a row whose every token is masked out."""
    from transformers import AutoTokenizer

    from pipeline.chat import assistant_spans, render, tokenize_with_assistant_mask

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")
    messages = [{"role": "user", "content": "Answer yes or no: is water wet?"}, {"role": "assistant", "content": "yes"}]
    text = render(tok, messages)
    start = len(render(tok, messages[:1], add_generation_prompt=True))
    assert assistant_spans(tok, messages, text, "</s>") == [(start, text.index("yes</s>", start) + len("yes</s>"))]
    enc = tokenize_with_assistant_mask(tok, messages, "</s>")
    assert tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]) == "yes</s>"
