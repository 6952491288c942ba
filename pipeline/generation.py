"""Sampling responses from a (LoRA) policy: the one helper behind SFT's before/after samples, `make pairs`,
PPO's rollouts and `make eval`.

Left padding (the new tokens of every row start at the same column), KV cache, stop at any stop token (the
tokenizer's EOS, every EOS of the checkpoint's generation_config, the template's end-of-turn token); everything
after the first stop token is padding and masked out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from pipeline.chat import TEMPLATE_KWARGS
from pipeline.config import ConfigError, stream_seed


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=48, metadata={"help": "Response length limit in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})


@dataclass
class Generations:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R] right-padded with pad after the first EOS (EOS kept)
    response_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS
    texts: list[str]
    ended: torch.Tensor  # [B] bool: a stop token was produced within the limit
    sampled_now: torch.Tensor | None = None  # [B] bool: sampled by this call, not kept from an interrupted run's


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a chat-templated conversation (some tokenizers return a dict even with return_dict=False). A
    conversation the template refuses (its raise_exception, e.g. roles out of order; an empty one) is a ConfigError."""
    import jinja2

    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=False, **TEMPLATE_KWARGS)
    except (jinja2.TemplateError, ValueError) as err:
        raise ConfigError(f"the chat template refuses the conversation {json.dumps(messages, default=str)[:80]} "
                          f"({type(err).__name__}: {err}): fix the conversation, or the model profile's chat_template") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def keep_end(ids: list[int], limit: int, bos_token_id: int | None) -> list[int]:
    """A prompt cut to `limit` tokens: its end (the latest turn and the assistant header), and a leading BOS kept in
    front, as the model always saw one there (the reward model's pairs are cut the same way: rm_data.truncate_pair)."""
    if len(ids) <= limit:
        return list(ids)
    if limit > 1 and bos_token_id is not None and ids[0] == bos_token_id:
        return [ids[0], *ids[len(ids) - limit + 1:]]
    return list(ids[len(ids) - limit:])


def encode_prompts(tokenizer, prompts: list[list[dict]], max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Chat-template each conversation and add the assistant header (`add_generation_prompt`)."""
    out = []
    for messages in prompts:
        ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
        out.append(keep_end(ids, max_prompt_tokens, tokenizer.bos_token_id) if max_prompt_tokens is not None else list(ids))
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def chat_reward_inputs(tokenizer, prompts: list[list[dict]], texts: list[str],
                       max_prompt_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a reward model reads: prompt + reply as an assistant turn, chat-templated exactly as RewardTrainer
    trained it, right-padded; and where each reply starts (after the prompt and its generation prompt: the tokens a
    `sum`-pooled reward model adds up from). PPO's rollouts and `make eval` both score through this one function.
    `max_prompt_tokens`: the prompt part cut as the policy's prompt was (keep_end): the reward model reads the prompt
    the reply answered, and a cut prompt's whole text no longer runs past a learned-position base's positions."""
    seqs, starts = [], []
    for m, t in zip(prompts, texts):
        seq = chat_ids(tokenizer, list(m) + [{"role": "assistant", "content": t}])
        start = common_prefix(seq, chat_ids(tokenizer, list(m), add_generation_prompt=True))
        prompt_part = seq[:start] if max_prompt_tokens is None else keep_end(seq[:start], max_prompt_tokens, tokenizer.bos_token_id)
        seqs.append([*prompt_part, *seq[start:]])
        starts.append(len(prompt_part))
    ids, mask = right_pad(seqs, tokenizer.pad_token_id)
    return ids, mask, torch.tensor(starts, dtype=torch.long)


def reply_closing_tokens(tokenizer, messages: list[dict]) -> int:
    """The tokens a chat template writes around a reply beyond the generation prompt and the reply's own: the
    end-of-turn and what follows it (Phi-3's EOS, ChatML's newline, Qwen3's empty think block). The reward model reads
    them after a sampled reply, so they must fit the base's positions too (check_context)."""
    if not getattr(tokenizer, "chat_template", None) or isinstance(messages, str):  # a plain-text prompt: untemplated
        return 0
    with_reply = chat_ids(tokenizer, list(messages) + [{"role": "assistant", "content": ""}])
    return max(len(with_reply) - len(chat_ids(tokenizer, list(messages), add_generation_prompt=True)), 0)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two id lists share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def stop_token_ids(tokenizer, model_or_generation_config=None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS, the generation_config's EOS ids (instruct checkpoints
    list several: Llama 3 has <|eot_id|>, <|eom_id|> and <|end_of_text|>), and the chat template's end-of-turn
    token when it is one special token (Gemma closes turns with <end_of_turn>, its EOS is <eos>)."""
    from pipeline.chat import end_of_turn

    config = getattr(model_or_generation_config, "generation_config", model_or_generation_config)
    listed = getattr(config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(listed if isinstance(listed, (list, tuple)) else [listed])]
    eot = end_of_turn(tokenizer)
    if eot:
        eot_ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
        added = getattr(tokenizer, "added_tokens_decoder", {})
        if len(eot_ids) == 1 and (eot_ids[0] in tokenizer.all_special_ids or getattr(added.get(eot_ids[0]), "special", False)):
            ids.append(eot_ids[0])
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def truncate_after_eos(response_ids: torch.Tensor, eos_id: int | list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything after the first stop token (`eos_id`: one id or several) becomes pad; returns (ids, mask, ended)."""
    stop = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=response_ids.dtype)
    is_eos = torch.isin(response_ids, stop.to(response_ids.device))
    ended = is_eos.any(dim=1)
    first = torch.where(ended, is_eos.int().argmax(dim=1), torch.full_like(ended, response_ids.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, ended


def batch_seed(generator_seed: int, batch_index: int) -> int:
    """Each batch samples from its own seed, so a batch gives the same tokens whichever process runs it and whatever
    ran before it (one process, or the batches spread over ranks). Batch 0 keeps the seed itself."""
    return stream_seed(generator_seed, batch_index)


@torch.no_grad()
def generate(model, tokenizer, prompt_token_ids: list[list[int]], cfg: SamplingConfig,
             generator_seed: int | None = None, progress: bool = False, batches_store=None) -> Generations:
    """Generate for each prompt, in batches of cfg.generation_batch_size; pad every batch's responses to
    cfg.max_new_tokens so they stack. With several processes every rank calls this with the same prompts: the batches
    are spread over the ranks and the result, in prompt order, comes back on every rank. On a sharded model
    (pipeline.sharding) each forward is a collective: the ranks run the same number of batches, and within a batch
    generation stops only when every rank's rows have ended (`synced_gpus`). `batches_store` (stages.resume.
    SampledBatches) keeps each finished batch and hands back those an interrupted run of the same command had
    finished; on a sharded model only a round whose batches every rank kept is skipped (they run every forward
    together)."""
    from tqdm.auto import tqdm

    from pipeline.sharding import is_sharded, on_every_rank, rank_and_world, reshard, spread

    device = next(model.parameters()).device
    stop_ids, pad_id = stop_token_ids(tokenizer, model), tokenizer.pad_token_id
    synced = is_sharded(model) and rank_and_world()[1] > 1
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k) \
        if cfg.temperature > 0 else dict(do_sample=False)
    starts = list(range(0, len(prompt_token_ids), cfg.generation_batch_size))
    # One bar, the main process's, of the batches it runs (spread: ceil(n / world) each): every rank's bar of all the
    # batches, on one line of a log, stopped at 26/52 and read as generation stuck half way.
    rank, world = rank_and_world()
    total = -(-len(starts) // world)
    bar = tqdm(total=total, desc="generate" if world == 1 else f"generate (rank 0's {total} of {len(starts)} batches)",
               disable=not progress or rank != 0, dynamic_ncols=True)

    def one_batch(b: int):
        kept = batches_store.get(b) if batches_store is not None else None
        if synced and batches_store is not None and not on_every_rank(kept is not None, device):
            kept = None  # another rank samples this round: every rank takes part in its forwards, and keeps its own
        if kept is not None:
            bar.update()
            return (*kept, False)
        if generator_seed is not None:
            torch.manual_seed(batch_seed(generator_seed, b))
        ids, mask = left_pad(prompt_token_ids[starts[b]: starts[b] + cfg.generation_batch_size], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_new_tokens,
                             use_cache=True, eos_token_id=stop_ids, pad_token_id=pad_id, synced_gpus=synced, **sampling)
        resp = out[:, ids.shape[1]:].cpu()
        if resp.shape[1] < cfg.max_new_tokens:  # every row stopped early
            resp = torch.cat([resp, torch.full((resp.shape[0], cfg.max_new_tokens - resp.shape[1]), pad_id)], dim=1)
        if batches_store is not None:
            batches_store.put(b, (ids, mask, resp))
        bar.update()
        return ids, mask, resp, True

    was_training = model.training
    model.eval()
    batches = spread(len(starts), one_batch)
    bar.close()
    if is_sharded(model):
        reshard(model)  # leave the model as found: no head kept gathered into the next training step
    if was_training:
        model.train()
    width = max(p.shape[1] for p, _, _, _ in batches)
    prompt_ids = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0), value=pad_id) for p, _, _, _ in batches])
    prompt_mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0), value=0) for _, m, _, _ in batches])
    response_ids, response_mask, ended = truncate_after_eos(torch.cat([r for _, _, r, _ in batches]), stop_ids, pad_id)
    sampled_now = torch.cat([torch.full((r.shape[0],), now) for _, _, r, now in batches])
    return Generations(prompt_ids, prompt_mask, response_ids, response_mask,
                       response_texts(tokenizer, response_ids, response_mask), ended, sampled_now)


def response_texts(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """The replies as text, as every reward model and judge reads them, in PPO's rollouts and in eval alike: the
    special tokens (EOS, end of turn) left out: a reward model's chat input puts the template's own end of turn after
    the reply, and a judge reads words."""
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
            for r, m in zip(response_ids.cpu(), response_mask.cpu())]
