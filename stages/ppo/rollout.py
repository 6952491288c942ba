"""Rollouts: sample responses with the policy adapter, then score them with the other adapters on the same base.

    rollout = collect(stack, tokenizer, prompts, prompt_ids, cfg, generator)   # one update's batch, this rank

Speed (generation is most of PPO's wall time; DESIGN "hard parts"):
- `sample` is a lean KV-cache loop on the un-merged LoRA model (no merge/unmerge: merging would drift the frozen
  base that the reference and reward adapters share). It records the log-prob of each sampled token under the
  temperature-scaled policy, so the update's "old" log-probs cost no extra forward pass, and it stops as soon as
  every row has produced EOS (every row of every rank when the base is sharded: sharding.py).
- Every forward trims the all-pad columns of its rows and asks the model for logits only at the positions that
  predict real response tokens (`logits_to_keep` with a boolean mask): no full-vocab logits over the prompt or
  the padding. The value and reward adapters skip the LM head entirely (trunk + scalar head).
- The critic-free estimators sample a group of answers per prompt; their scoring and update forwards run each
  group's prompt once and continue its answers on the prompt's KV cache (`pack(..., group=k)`): the same numbers,
  about half the tokens (GRPO on the story task: 3.6 -> 3.0 s per update, peak memory 688 -> 553 MB).
- The reference forward is skipped when no KL term is used.
- The value adapter trains only its top layers (`TopLayers`, config value_trainable_layers): the rollout's value
  pass keeps the hidden states entering them, and every update pass replays those instead of recomputing the
  frozen layers below. When the RM reads the policy's own tokens, its pass replays them too (same frozen weights).
Positions: prompts are left-padded, so every forward passes position_ids = cumsum(mask) - 1, which keeps absolute
position models (GPT-2) correct and matches the right-padded layout SFT trained on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from pipeline.config import ConfigError
from pipeline.adapters import adapter_of, ensemble_score, head_output, pool_scores
from pipeline.generation import chat_reward_inputs, left_pad, response_texts, stop_token_ids, truncate_after_eos
from pipeline.models import backbone
from pipeline.sharding import on_every_rank

from .losses import entropy_from_logits


@dataclass
class Packed:
    """Prompt + response rows laid out for one forward: trimmed, with positions and the response positions."""

    ids: torch.Tensor  # [b, L]
    attention_mask: torch.Tensor  # [b, L]
    position_ids: torch.Tensor  # [b, L]
    keep: torch.Tensor  # [b, L] bool: positions whose next-token prediction is a real response token
    response_mask: torch.Tensor  # [b, R'] bool, R' = longest response in these rows
    tokens: torch.Tensor  # [N] the real response tokens, row-major (the order of keep's True entries)
    cols: slice = field(default_factory=lambda: slice(None))  # these columns of the rollout's [query ++ response] layout (for cached hidden states)
    group: int = 1  # > 1: rows come in groups of `group` answers to one prompt, which every forward runs once
    prompt_width: int = 0  # the prompt columns of ids (the answers start there)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def pack(query_ids, query_mask, response_ids, response_mask, group: int = 1) -> Packed:
    """Left-padded prompts + right-padded responses -> one trimmed batch (drop columns that are pad in every row).

    `group` > 1: consecutive rows are groups of that many answers to one prompt (GRPO, RLOO); the forwards then run
    each prompt once and its answers on its KV cache (`response_logits`, `trunk_hidden`): same numbers, about half
    the tokens when prompts are as long as the answers."""
    P = query_ids.shape[1]
    first = P - int(query_mask.sum(1).max())  # leading columns that are pad in every row
    r_eff = max(int(response_mask.sum(1).max()), 1)
    resp_mask = response_mask[:, :r_eff].bool()
    ids = torch.cat([query_ids[:, first:], response_ids[:, :r_eff]], dim=1)
    attn = torch.cat([query_mask[:, first:], resp_mask.long()], dim=1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    keep = torch.zeros_like(attn, dtype=torch.bool)
    p = P - first
    keep[:, p - 1 : p - 1 + r_eff] = resp_mask
    if group > 1:
        check_groups(ids[:, :p], group)
    return Packed(ids, attn, pos, keep, resp_mask, response_ids[:, :r_eff][resp_mask], slice(first, P + r_eff),
                  group, p)


def check_groups(prompt_ids: torch.Tensor, group: int) -> None:
    """Consecutive rows must be whole groups of `group` copies of one prompt (a forward runs each prompt once)."""
    if prompt_ids.shape[0] % group:
        raise ValueError(f"{prompt_ids.shape[0]} rows are not whole groups of {group} answers to one prompt")
    head = prompt_ids.reshape(-1, group, prompt_ids.shape[1])
    if not torch.equal(head, head[:, :1].expand_as(head)):
        raise ValueError(f"the rows are not whole groups of {group} answers to one prompt")


def by_group_length(lengths: torch.Tensor, group: int) -> torch.Tensor:
    """Row order that puts groups of similar length together (by their longest row) and keeps each group whole."""
    longest = lengths.view(-1, group).max(1).values
    return (torch.argsort(longest, stable=True)[:, None] * group + torch.arange(group, device=lengths.device)).reshape(-1)


def unflatten(flat: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """[N] values of the real tokens -> [b, width] with zeros elsewhere."""
    out = torch.zeros(mask.shape[0], width, dtype=flat.dtype, device=flat.device)
    out[:, : mask.shape[1]][mask] = flat
    return out


def response_logits(lm, x: Packed) -> torch.Tensor:
    """[N, V] float logits at the positions predicting the real response tokens (no other vocab projections)."""
    if x.group == 1:
        out = lm(input_ids=x.ids, attention_mask=x.attention_mask, position_ids=x.position_ids, use_cache=False,
                 logits_to_keep=x.keep)
        return out.logits.float()
    p = x.prompt_width
    head = prompt_once(lm, x.ids[:, :p], x.attention_mask[:, :p], x.position_ids[:, :p], x.group, logits_to_keep=1)
    tail = lm(input_ids=x.ids[:, p:], attention_mask=x.attention_mask, position_ids=x.position_ids[:, p:],
              cache=head.cache, use_cache=True, logits_to_keep=x.keep[:, p:])
    # x.keep's row-major order: column p - 1 (the prompt's last position, predicting an answer's first token) comes
    # from its group's prompt pass (repeated for each answer), every later column from the answers' pass. Every row
    # is picked at most once: the gather's backward is an index_put_ that accumulates, which on a CPU with 2+ threads
    # adds repeated indices with atomics, in an order that thread timing decides (under load, two runs differed at
    # ~1e-6 from update 2); repeat_interleave's backward sums a group's answers in a fixed order.
    b = x.ids.shape[0]
    source = torch.zeros(x.keep.shape, dtype=torch.long, device=x.ids.device)
    source[:, p - 1] = torch.arange(b, device=x.ids.device)
    tail_keep = x.keep[:, p:]
    source[:, p:][tail_keep] = b + torch.arange(int(tail_keep.sum()), device=x.ids.device)
    head_rows = head.logits[:, -1].repeat_interleave(x.group, 0)
    return torch.cat([head_rows, tail.logits]).float()[source[x.keep]]


def prompt_once(module, ids, mask, pos, group: int, **kw):
    """One forward over the first row of each group of `group` rows that share a prompt (check_groups); its KV cache
    (`.cache`) is repeated for every row of the group, ready for the answers' tokens."""
    out = module(input_ids=ids[::group], attention_mask=mask[::group], position_ids=pos[::group], use_cache=True, **kw)
    out.cache.batch_repeat_interleave(group)
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token] for flat [N, V] logits, without materialising the full log-softmax."""
    logits = logits / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def trunk_hidden(lm, x: Packed) -> torch.Tensor:
    """[b, L, H] last hidden states of x's layout (with x.group > 1: each prompt's once, repeated for its answers)."""
    body = backbone(lm)
    if x.group == 1:
        return body(input_ids=x.ids, attention_mask=x.attention_mask, position_ids=x.position_ids,
                    use_cache=False).last_hidden_state
    p = x.prompt_width
    head = prompt_once(body, x.ids[:, :p], x.attention_mask[:, :p], x.position_ids[:, :p], x.group)
    tail = body(input_ids=x.ids[:, p:], attention_mask=x.attention_mask, position_ids=x.position_ids[:, p:],
                cache=head.cache, use_cache=True).last_hidden_state
    return torch.cat([head.last_hidden_state.repeat_interleave(x.group, 0), tail], 1)


def token_values(lm, x: Packed, top: "TopLayers | None" = None, cached: torch.Tensor | None = None) -> torch.Tensor:
    """[N] value of the state before each real response token (the active adapter's scalar head).

    With `top` and `cached` (the rollout's hidden states entering the top layers, [b, L] columns of x), only the top
    layers run: the frozen layers below would recompute exactly `cached`."""
    if top is None or cached is None:
        return head_output(lm, trunk_hidden(lm, x)[x.keep])
    with top.replay(cached):
        return head_output(lm, trunk_hidden(lm, x)[x.keep])


def decoder_layers(lm) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM: `model.layers` (Llama, Qwen2, GPT-NeoX), `transformer.h` (GPT-2),
    `model.decoder.layers` (OPT): the outermost list of num_hidden_layers modules in the trunk."""
    body, n = backbone(lm), lm.config.get_text_config().num_hidden_layers  # a vision-language base: its text model's
    lists = {name: m for name, m in body.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n}
    depth = min((name.count(".") for name in lists), default=0)
    found = [m for name, m in lists.items() if name.count(".") == depth]
    if len(found) != 1:
        raise ValueError(f"cannot find the {n} decoder layers of {type(lm).__name__}")
    return found[0]


class TopLayers:
    """The value adapter trains only its top `n` decoder layers (+ the scalar head); its LoRA below stays as the
    reward model left it. Those frozen layers give the same output for a rollout row in every update pass, so the
    rollout's value forward records it (`capture`) and the update passes feed it in place of the bottom layers
    (`replay`): the update's value forward and backward cost n/L of a full pass, with identical results.

        top = TopLayers(lm, 1)
        with top.capture(store): values = token_values(lm, x)       # rollout: full forward, keep layer cut-1's output
        with top.replay(hidden): values = token_values(lm, x)       # update: bottom layers return `hidden`
    """

    def __init__(self, lm, n: int):
        self.layers = decoder_layers(lm)
        self.cut = len(self.layers) - n  # index of the first trained layer
        if not 0 < self.cut < len(self.layers):
            raise ValueError(f"value_trainable_layers={n} must be in 1..{len(self.layers) - 1} (0 = all layers)")
        self.returns_tuple = False
        self.reward_shares_bottom = False  # set by the trainer after checking same_below("value", "reward")

    def frozen_modules(self) -> list[torch.nn.Module]:
        return list(self.layers[: self.cut])

    def same_below(self, a: str, b: str) -> bool:
        """Adapters a and b have identical weights in the frozen layers (value and reward both load the RM there),
        so on the same tokens they share those layers' output: the reward pass can replay the value's."""
        for m in self.frozen_modules():
            params = dict(m.named_parameters())
            for n, p in params.items():
                if adapter_of(n) == a:
                    other = params.get(n.replace(f".{a}.", f".{b}."))
                    if other is None or not torch.equal(p, other):
                        return False
        return True

    @contextmanager
    def capture(self, store: list):
        def hook(_module, _args, output):
            self.returns_tuple = isinstance(output, tuple)
            store.append((output[0] if self.returns_tuple else output).detach())

        handle = self.layers[self.cut - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def replay(self, hidden: torch.Tensor):
        wrap = (lambda h: (h,)) if self.returns_tuple else (lambda h: h)  # noqa: E731
        bottom = self.layers[: self.cut]
        for i, layer in enumerate(bottom):  # an instance attribute shadows the class's forward (nn.Module.__call__)
            layer.forward = (lambda *a, **k: wrap(hidden)) if i == self.cut - 1 else (lambda h, *a, **k: h)
        try:
            yield
        finally:
            for layer in bottom:
                del layer.forward


def sequence_scores(lm, x: Packed, pooling: str = "last") -> torch.Tensor:
    """[b] the active reward adapter's score of x's rows by its pooling (pipeline.adapters.pool_scores: 'last' reads
    the rightmost non-pad token, before a final EOS when pad == eos, as the reward model was trained; 'sum' adds up
    the response, which starts at column x.prompt_width in every row)."""
    starts = torch.full((x.ids.shape[0],), x.prompt_width, dtype=torch.long)
    return pool_scores(head_output(lm, trunk_hidden(lm, x)), x.ids, x.attention_mask, lm.config.pad_token_id, pooling,
                       starts)


@dataclass
class Sampled:
    response_ids: torch.Tensor  # [B, R] pad after the first EOS
    response_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS
    logprobs: torch.Tensor  # [B, R] log-prob of each sampled token under softmax(logits / T); 0 where masked
    entropy: torch.Tensor  # [B, R] entropy of that distribution; 0 where masked
    ended: torch.Tensor  # [B] bool, an EOS was produced


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of [B, V] probabilities by inverting the CDF at a uniform draw: on CPU ~20x cheaper than
    torch.multinomial (which spent ~10% of rollout time drawing exponentials). Exact up to the float32 running sum: a
    token of probability below its rounding (~3e-8 of a large vocabulary's) can be skipped or over-drawn, while the
    mass such tokens share is drawn right (a 128k vocabulary, 60,000 draws: 0.00052 of them for 0.00050)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


@torch.no_grad()
def sample(lm, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float, stop_ids: list[int], pad_id: int,
           generator: torch.Generator, stop_at_eos: bool = True, all_ranks_done=None, group: int = 1) -> Sampled:
    """Sample up to max_new_tokens per left-padded prompt with a KV cache; a row ends at its first stop token (any of
    `stop_ids`: instruct checkpoints have several), and sampling stops when every row has ended.

    `all_ranks_done(local_done) -> bool` (a sharded base): every rank must run the same forwards, so the loop ends
    when every rank's rows have ended; a rank that is done first keeps feeding the model (its all-gathers serve the
    others) but samples nothing more, so it returns and draws from `generator` exactly what it would alone.

    `group` > 1: consecutive rows are groups of that many copies of one prompt; the prefill runs each prompt once."""
    B, P = prompt_ids.shape
    device = prompt_ids.device
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    mask = torch.ones(B, P + max_new_tokens, dtype=prompt_mask.dtype, device=device)
    mask[:, :P] = prompt_mask
    pos = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    if group > 1:
        check_groups(prompt_ids, group)
        out = prompt_once(lm, prompt_ids, prompt_mask, pos, group, logits_to_keep=1)
        out.logits = out.logits.repeat_interleave(group, 0)
    else:
        out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    next_pos = pos[:, -1:] + 1
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    ents = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n, finished = 0, False
    for t in range(max_new_tokens):
        if not finished:
            logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
            probs = logp.exp()
            tok = sample_from(probs, generator)
            live = ~done
            tokens[:, t] = torch.where(live, tok, pad_id)
            logps[:, t] = torch.where(live, logp.gather(1, tok.unsqueeze(1)).squeeze(1), 0.0)
            ents[:, t] = torch.where(live, -(probs * logp).sum(-1), 0.0)
            n = t + 1
            if stop_at_eos:
                done = done | torch.isin(tok, stops)
            finished = n == max_new_tokens or bool(done.all())
        if finished if all_ranks_done is None else all_ranks_done(finished):
            break
        out = lm(input_ids=tok.unsqueeze(1), attention_mask=mask[:, : P + t + 1], position_ids=next_pos,
                 cache=out.cache, use_cache=True)
        next_pos = next_pos + 1
    tokens, logps, ents = tokens[:, :n], logps[:, :n], ents[:, :n]
    if stop_at_eos:
        tokens, rmask, ended = truncate_after_eos(tokens.cpu(), list(stop_ids), pad_id)
        tokens, rmask, ended = tokens.to(device), rmask.to(device), ended.to(device)
    else:
        rmask = torch.ones_like(tokens)
        ended = torch.isin(tokens, stops).any(1)
    return Sampled(tokens, rmask, logps * rmask, ents * rmask, ended)


@dataclass
class Rollout:
    """One update's episodes on this rank. [B, R] tensors are 0 beyond each response's last real token."""

    prompts: list  # the prompt conversations (for the reward's chat input and the sample table)
    query_ids: torch.Tensor  # [B, P] left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # old policy log-probs (from sampling)
    ref_logprobs: torch.Tensor | None  # None when no KL term is used
    values: torch.Tensor  # value adapter, before each response token
    scores_raw: torch.Tensor  # [B] reward model (or reward_fn) score
    ended: torch.Tensor  # [B] bool
    entropy: torch.Tensor  # [B, R] of the sampling distribution
    texts: list[str]
    value_hidden: torch.Tensor | None = None  # [B, P + R, H] entering the value's trained top layers (TopLayers)
    time_generate_s: float = 0.0
    time_score_s: float = 0.0

    @property
    def lengths(self) -> torch.Tensor:
        """[B] real tokens per row (prompt + response)."""
        return self.query_mask.sum(1) + self.response_mask.sum(1)

    def rows(self, idx: torch.Tensor, group: int = 1) -> Packed:
        return pack(self.query_ids[idx], self.query_mask[idx], self.response_ids[idx], self.response_mask[idx], group)

    def cached_hidden(self, idx: torch.Tensor, x: Packed) -> torch.Tensor | None:
        return None if self.value_hidden is None else self.value_hidden[idx][:, x.cols]


@torch.no_grad()
def collect(stack, tokenizer, prompts: list, prompt_ids: list[list[int]], cfg, generator: torch.Generator,
            reward_fn=None, top: TopLayers | None = None) -> Rollout:
    """Generate with `policy`, then reference log-probs, values (`value`) and scores (`reward` or reward_fn).
    With `top`, the value pass also keeps the hidden states entering the value's trained top layers."""
    import time

    lm = stack.causal_lm
    device = next(lm.parameters()).device
    stop_ids, pad_id = stop_token_ids(tokenizer, lm), tokenizer.pad_token_id
    has_value = "value" in stack.model.peft_config
    lm.eval()
    # A sharded base (stages/ppo/sharding.py): the sampling loops end together on every rank.
    all_ranks_done = (lambda flag: on_every_rank(flag, device)) if getattr(stack, "sharded", False) else None  # noqa: E731

    t0 = time.perf_counter()
    stack.use("policy")
    parts = []
    k = cfg.prompt_group  # rows come in groups of k copies of one prompt: every forward runs the prompt once
    chunk = max(k, cfg.generation_batch_size // k * k)
    for s in range(0, len(prompt_ids), chunk):
        q_ids, q_mask = left_pad(prompt_ids[s : s + chunk], pad_id)
        q_ids, q_mask = q_ids.to(device), q_mask.to(device)
        parts.append((q_ids, q_mask, sample(lm, q_ids, q_mask, cfg.response_length, cfg.temperature, stop_ids, pad_id,
                                            generator, cfg.stop_at_eos, all_ranks_done, k)))
    query_ids, query_mask = _cat_left([p[0] for p in parts], pad_id), _cat_left([p[1] for p in parts], 0)
    cat = lambda name, fill: _cat_right([getattr(p[2], name) for p in parts], fill)  # noqa: E731
    response_ids, response_mask = cat("response_ids", pad_id), cat("response_mask", 0)
    logprobs, entropy = cat("logprobs", 0.0), cat("entropy", 0.0)
    ended = torch.cat([p[2].ended for p in parts])
    texts = response_texts(tokenizer, response_ids, response_mask)
    t1 = time.perf_counter()

    B, R = response_ids.shape
    ref = torch.zeros(B, R, device=device) if cfg.needs_reference else None
    values, scores = torch.zeros(B, R, device=device), torch.zeros(B, device=device)
    value_hidden = None
    # Chunks of rows of similar length: less padding in every forward (the results go back to their rows). Groups of
    # answers to one prompt stay whole, so that each prompt runs once.
    order = by_group_length(query_mask.sum(1) + response_mask.sum(1), k)
    chunk = max(k, cfg.forward_batch_size // k * k)
    for s in range(0, B, chunk):
        idx = order[s : s + chunk]
        x = pack(query_ids[idx], query_mask[idx], response_ids[idx], response_mask[idx], k)
        if cfg.recompute_old_logprobs:  # the update's own forward path: in bf16 the KV-cache loop differs from it
            stack.use("policy")
            logprobs[idx] = unflatten(token_logprobs(response_logits(lm, x), x.tokens, cfg.temperature), x.response_mask, R)
        if ref is not None:
            stack.use("reference")
            ref[idx] = unflatten(token_logprobs(response_logits(lm, x), x.tokens, cfg.temperature), x.response_mask, R)
        if not has_value:  # critic-free estimators: no value adapter, no value pass
            pass
        elif top is None:
            stack.use("value")
            values[idx] = unflatten(token_values(lm, x), x.response_mask, R)
        else:
            stack.use("value")
            store: list[torch.Tensor] = []
            with top.capture(store):
                values[idx] = unflatten(token_values(lm, x), x.response_mask, R)
            if value_hidden is None:
                value_hidden = store[0].new_zeros(B, query_ids.shape[1] + R, store[0].shape[-1])
            value_hidden[idx, x.cols] = store[0]
        if reward_fn is None and cfg.reward_input == "chat":
            rows = idx.tolist()
            r_ids, r_mask, r_starts = chat_reward_inputs(tokenizer, [prompts[i] for i in rows], [texts[i] for i in rows],
                                                         cfg.max_prompt_length)  # the prompt as the policy saw it
            scores[idx] = stack.scores("reward", r_ids.to(device), r_mask.to(device), r_starts).float()
        elif reward_fn is None:  # the policy's own tokens, scored by each member of the reward model
            members, member_stats = stack.ensemble_of("reward")
            each = []
            for member in members:
                stack.use(member)
                pooling = stack.pooling.get(member, "last")
                if member == "reward" and top is not None and top.reward_shares_bottom:
                    with top.replay(store[0]):  # same tokens, same frozen layers: only the reward's top layers run
                        each.append(sequence_scores(lm, x, pooling))
                else:
                    each.append(sequence_scores(lm, x, pooling))
            scores[idx] = ensemble_score(torch.stack(each), member_stats)
    if reward_fn is not None:
        scores = torch.as_tensor(reward_fn(prompts, response_ids, response_mask, texts), dtype=torch.float32, device=device)
        if scores.shape != (len(texts),):  # one score broadcast to every reply, or a [B, 1] column, trained silently
            raise ConfigError(f"reward_fn gave scores of shape {tuple(scores.shape)} for {len(texts)} responses: return "
                              f"one number per response, in order")
    t2 = time.perf_counter()
    return Rollout(prompts=list(prompts), query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                   response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref, values=values, scores_raw=scores,
                   ended=ended, entropy=entropy, texts=texts, value_hidden=value_hidden, time_generate_s=t1 - t0,
                   time_score_s=t2 - t1)


def _cat_left(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill) for t in tensors])


def _cat_right(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors])


__all__ = ["Packed", "Rollout", "TopLayers", "by_group_length", "collect", "decoder_layers", "entropy_from_logits", "pack", "response_logits", "sample",
           "sequence_scores", "token_logprobs", "token_values", "unflatten"]
