"""Chat templates as the pipeline reads them: which text ends an assistant turn, and which tokens of a conversation
are the assistant's (SFT's loss mask).

Both are found by rendering the template, never by knowing its family, so any template works: the bundled tiny
one, Llama 3.x, ChatML (Qwen2.5, Qwen3, SmolLM2), Gemma, Phi-3. TRL 1.16 can mask only templates that carry
`{% generation %}` markers or that it knows how to patch; it refuses Llama 3.1/3.2 and any ChatML variant it has
not stored (SmolLM2's), which is why SFT builds the mask here.

The mask of assistant turn i: render messages[:i] with the generation prompt (P_i) and the whole conversation (S).
S starts with P_i; the turn's tokens run from there to the end-of-turn text, which is included so the model learns
to stop. Trailing whitespace between turns ('\\n' in ChatML) belongs to no one and is not trained.
"""

from __future__ import annotations

from pipeline.config import ConfigError

_PROBE_USER, _PROBE_REPLY, _PROBE_NEXT = "Hi", "Hello", "Bye"
# Every render of a template gets these. Llama 3.1/3.2's templates write "Today Date:" from the clock unless given
# date_string: the same conversation would then be other tokens on another day (and a reward model trained on one
# date scores another's). This is the date those templates fall back to themselves.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **TEMPLATE_KWARGS)


def end_of_turn(tokenizer) -> str | None:
    """The text a chat template writes after an assistant reply to close the turn ('<|eot_id|>', '<|im_end|>',
    '<end_of_turn>', '</s>'); None without a template or when it writes none.

    Rendered twice, as the last turn and with a user turn after it: what both put right after the reply (compared
    token by token, without the whitespace between turns) is the turn's own ending. Phi-3 adds its EOS after the
    last turn only; the comparison leaves it out."""
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return _end_of_turn(tokenizer)
    except jinja2.TemplateError:  # a template that refuses the probe conversation names no end-of-turn text
        return None


def _end_of_turn(tokenizer) -> str | None:
    user, reply = {"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}
    tails = []
    for messages in ([user, reply], [user, reply, {"role": "user", "content": _PROBE_NEXT}]):
        text = render(tokenizer, messages)
        prompt = render(tokenizer, [user], add_generation_prompt=True)
        if not text.startswith(prompt) or _PROBE_REPLY not in text[len(prompt):]:
            return None
        turn = text[len(prompt):]
        tails.append(tokenizer(turn[turn.index(_PROBE_REPLY) + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"])
    common = []
    for a, b in zip(*tails):
        if a != b:
            break
        common.append(a)
    return tokenizer.decode(common).rstrip() or None


def assistant_spans(tokenizer, messages: list[dict], text: str, eot: str, first: int = 0) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the rendered conversation), each ending with `eot`; those
    from message `first` on (a prompt-completion row's prompt may hold assistant turns: context, not trained on)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        if i == 0:
            raise ConfigError("a conversation starts with an assistant turn: give each assistant turn a turn before it")
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ConfigError(
                f"the chat template renders the conversation before assistant turn {i} differently once later turns "
                f"follow, so SFT cannot tell which tokens are the assistant's: use a template that keeps earlier turns "
                f"as they were (model profile `chat_template:`) or set assistant_only_loss: false")
        start = len(prompt)
        reply = (message.get("content") or "").strip()  # templates may trim the reply; it is still in the text
        at = text.find(reply, start) if reply else -1
        search_from = at + len(reply) if at >= 0 else start
        end = text.find(eot, search_from)
        if end < 0:
            raise ConfigError(f"assistant turn {i} does not end with the template's end-of-turn text {eot!r}: "
                              f"fix the chat template or set assistant_only_loss: false")
        spans.append((start, end + len(eot)))
    return spans


def tokenize_with_assistant_mask(tokenizer, messages: list[dict], eot: str, first: int = 0) -> dict:
    """input_ids of the chat-templated conversation (exactly what apply_chat_template(tokenize=True) gives) and
    assistant_masks: 1 on every token that overlaps an assistant turn (its reply and end-of-turn text) from message
    `first` on."""
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text, eot, first)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < b and a < e for s, e in spans)) for a, b in enc["offset_mapping"]]
    return {"input_ids": list(enc["input_ids"]), "assistant_masks": mask}


def require_end_of_turn(tokenizer) -> str:
    """The template's end-of-turn text; refused: a template that writes none, one whose end-of-turn does not end in a
    token generation stops at (a TRL template's '<|im_end|>' on a GPT-2 tokenizer is eight ordinary tokens: the model
    would learn to write them and go on), or one whose generation prompt adds nothing (SFT would then train the model
    to write the assistant header itself, while pairs, PPO and eval sample after prompts that end without it)."""
    import jinja2

    from pipeline.generation import stop_token_ids

    if getattr(tokenizer, "chat_template", None):
        try:  # a template that does not compile read as one that "closes assistant turns with no end-of-turn text"
            render(tokenizer, [{"role": "user", "content": _PROBE_USER}])
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"the chat template is not valid Jinja: {err.message} (line {err.lineno} of the template): "
                              f"fix it (model profile `chat_template:`)") from None
        except jinja2.TemplateError:  # it compiles, and refuses the probe (raise_exception): end_of_turn says why
            pass
    eot = end_of_turn(tokenizer)
    if not eot:
        raise ConfigError("the chat template closes assistant turns with no end-of-turn text, so a model trained on "
                          "it could not learn to stop: set a template that does (model profile `chat_template:`)")
    eot_ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(tokenizer)
    if not eot_ids or eot_ids[-1] not in stops:
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in stops)
        raise ConfigError(f"the chat template ends assistant turns with {eot!r}, which this tokenizer writes as "
                          f"{len(eot_ids)} token(s) ending in no stop token (stops: {names}), so generation would never "
                          f"end at a turn's end: use a template that closes each assistant turn with the tokenizer's EOS "
                          f"{tokenizer.eos_token!r} (model profile `chat_template:`), or a tokenizer that has {eot!r} "
                          f"as a special token")
    user = [{"role": "user", "content": _PROBE_USER}]
    plain = render(tokenizer, user)
    if render(tokenizer, user, add_generation_prompt=True) == plain:
        # No generation prompt: fine where a reply follows the prompt at once (Mistral's `[/INST]`, Llama 2's), not
        # where the template writes a header before it (ChatML without its generation prompt: SFT would train the
        # model to write the header, while pairs, PPO and eval sample after prompts that end without it)
        full = render(tokenizer, [*user, {"role": "assistant", "content": _PROBE_REPLY}])
        at = full.find(_PROBE_REPLY, len(plain)) if full.startswith(plain) else -1
        if at < 0 or full[len(plain):at].strip():
            raise ConfigError("the chat template adds nothing for add_generation_prompt=True but writes an assistant "
                              "header before a reply, so the prompts sampled from would not end where SFT's replies "
                              "start: set a template that writes the header as its generation prompt (model profile "
                              "`chat_template:`)")
    return eot
