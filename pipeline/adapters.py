"""One frozen base model in memory, several named LoRA adapters on it.

    stack = AdapterStack.build(profile, tokenizer, adapters={"reference": sft_dir, "policy": sft_dir,
                                                            "reward": rm_dir, "value": rm_dir},
                               trainable=("policy", "value"))
    stack.logits("policy", ids, mask); stack.scores("reward", ids, mask); stack.values("value", ids, mask)

Reward and value adapters are sequence-classification adapters (LoRA + a scalar `score` head saved in the
adapter, as TRL's RewardTrainer writes them). The base is a causal LM, so we add a `score` slot to it *before*
wrapping it in peft: peft then keeps one copy of the head per adapter (`score.modules_to_save.<name>`), and the
active adapter picks its own. Without the slot, `load_adapter` silently drops the head and the reward is random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.models import backbone, check_adapter, hidden_size_of, load_base
from pipeline.run import replace_folder, staging_folder


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Where *ForSequenceClassification reads its score: the rightmost token that is not pad (left or right padding).

    Same rule as transformers, so that with pad == eos (Llama-3 style tokenizers) the score is read before the final
    EOS, exactly where the reward model was trained to put it.
    """
    keep = attention_mask.bool()
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * keep).argmax(dim=1)


# How a reward model turns its head's output at every token into one score (`pooling:` in configs/rm.yaml; `make rm`
# writes it beside each adapter in score_pooling.json, and everything that scores reads it from there):
#   last: the head at the last real token, as *ForSequenceClassification reads it (stock transformers and peft);
#   sum:  the sum of the head over the reply's tokens (from the first token after the templated prompt and its
#         generation prompt to the last real one), divided by SUM_DIVISOR. A property that adds up over words (the
#         story task's lexicon gold) is then the head's per-token job instead of something one token's state must
#         summarise (README, "Reward pooling"). The prompt's tokens are left out so that the score carries no
#         per-prompt offset (on the default run they made up most of the scores' spread across prompts, and PPO's
#         normalised reward shrank by as much); in training they cancel within a pair anyway (causal attention: the
#         prompt's states never see the reply), so RewardTrainer may sum every token.
POOLINGS = ("last", "sum")
POOLING_FILE = "score_pooling.json"
# A fixed temperature on the sum: a raw sum (~60 terms) saturates the Bradley-Terry loss on noisy labels within an
# epoch; /16 ordered 0.76 of held-out story pairs as the gold does, the raw sum 0.64-0.70 (README).
SUM_DIVISOR = 16.0


def pool_scores(per_token: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pad_token_id: int | None, pooling: str, starts: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] head outputs -> [B] scores by `pooling` (POOLINGS). `starts` [B]: each row's first reply position
    (sum counts from there; None: from the first token). Left or right padding: masked tokens never count."""
    index = last_token_index(input_ids, attention_mask, pad_token_id)
    if pooling == "last":
        return per_token.gather(1, index.unsqueeze(1)).squeeze(1)
    if pooling != "sum":
        raise ValueError(f"unknown score pooling {pooling!r}: one of {', '.join(POOLINGS)}")
    positions = torch.arange(per_token.shape[1], device=per_token.device).unsqueeze(0)
    counted = (positions <= index.unsqueeze(1)) & attention_mask.bool()
    if starts is not None:
        counted &= positions >= starts.to(per_token.device).unsqueeze(1)
    return (per_token.float() * counted).sum(dim=1) / SUM_DIVISOR


def prompt_part(input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor,
                pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows cut to their first `starts` tokens. With pool_in_forward's sum, a stock model's score of
    the whole row minus its score of this is the reply's sum (pool_scores with starts): causal attention."""
    keep = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) < starts.unsqueeze(1)
    keep &= attention_mask.bool()
    width = max(int(keep.sum(1).max()), 1)
    return torch.where(keep, input_ids, pad_token_id)[:, :width], keep.long()[:, :width]


def read_pooling(adapter_dir: str | Path) -> str:
    """The pooling a reward adapter was trained with; 'last' for adapters without score_pooling.json (any stock
    reward model, and ours from before the file existed)."""
    path = Path(adapter_dir) / POOLING_FILE
    if not path.is_file():
        return "last"
    recorded = json.loads(path.read_text())
    pooling = recorded.get("pooling")
    if pooling not in POOLINGS:
        from pipeline.config import ConfigError

        raise ConfigError(f"{path}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling == "sum" and recorded.get("sum_divisor") != SUM_DIVISOR:
        # pool_scores and pool_in_forward divide by SUM_DIVISOR whatever the file says: a file that says otherwise
        # (edited, or another version's) describes a score this code would not compute
        from pipeline.config import ConfigError

        raise ConfigError(f"{path}: sum_divisor {recorded.get('sum_divisor')!r} is not {SUM_DIVISOR:g}, the divisor "
                          f"this version scores with: put the file back as `make rm` wrote it, or retrain the reward "
                          f"model (`make rm FORCE=1`)")
    return pooling


def read_sum_divisor(adapter_dir: str | Path) -> float | None:
    """What a `sum`-pooled reward adapter's score is divided by (what a user of the published adapter divides by, as
    its score_pooling.json says: read_pooling refuses a file that says otherwise); None for `last` pooling."""
    return SUM_DIVISOR if read_pooling(adapter_dir) == "sum" else None


def write_pooling(adapter_dir: str | Path, pooling: str) -> None:
    (Path(adapter_dir) / POOLING_FILE).write_text(json.dumps(
        {"pooling": pooling, "sum_divisor": SUM_DIVISOR if pooling == "sum" else None,
         "rule": "score = sum of the score head over the reply's tokens (after the templated prompt and its generation "
                  "prompt, up to the last real one) / sum_divisor" if pooling == "sum"
         else "score = the score head at the last real token (stock *ForSequenceClassification)"}, indent=1) + "\n")


def pool_in_forward(model, pooling: str):
    """Make a *ForSequenceClassification (peft-wrapped or not) return `pooling`'s score from its own forward, so that
    RewardTrainer's loss, a sharded forward and a stock reload all score as pool_scores does. Two hooks: one keeps
    the forward's attention mask, one turns the head's [B, T, 1] output into its running masked sum / SUM_DIVISOR,
    which transformers then reads at the last real token. 'last' leaves the model as it is."""
    if pooling == "last":
        return model
    if pooling != "sum":
        raise ValueError(f"unknown score pooling {pooling!r}: one of {', '.join(POOLINGS)}")
    from pipeline.models import score_head_name

    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(classifier, score_head_name(classifier))
    seen: dict = {}

    def keep_mask(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        # With a cache (a shared prefix) the mask covers the cached tokens too: the head sees the last columns only.
        seen["mask"] = mask[:, -ids.shape[1]:] if mask is not None else torch.ones_like(ids)

    def running_sum(module, args, output):
        mask = seen["mask"].to(output.device).unsqueeze(-1)
        return ((output.float() * mask).cumsum(dim=1) / SUM_DIVISOR).to(output.dtype)

    classifier.register_forward_pre_hook(keep_mask, with_kwargs=True)
    head.register_forward_hook(running_sum)
    return model


def ensemble_score(member_scores: torch.Tensor, member_stats: list[tuple[float, float]]) -> torch.Tensor:
    """[M, B] scores of M reward models -> [B]. One model: its own score, unchanged. Several: the mean of their
    standardised scores, (s_i - mean_i) / std_i with each member's held-out mean and std, so that no member weighs
    more for a wider scale (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization", mean)."""
    if len(member_scores) == 1:
        return member_scores[0]
    mean = member_scores.new_tensor([m for m, _ in member_stats]).unsqueeze(1)
    std = member_scores.new_tensor([s for _, s in member_stats]).unsqueeze(1)
    return ((member_scores - mean) / std).mean(dim=0)


def reward_members(rm_manifest: dict) -> tuple[dict[str, str], list[tuple[float, float]]]:
    """The reward models of an rm stage's manifest: {"reward": first adapter, "reward-1": second, ...} and each one's
    held-out (reward_mean, reward_std). An rm manifest of older versions lists no members: its one adapter."""
    listed = rm_manifest["outputs"].get("members")  # a JSON list (manifest outputs are strings)
    dirs = json.loads(listed) if listed else [rm_manifest["outputs"]["adapter"]]
    rows = rm_manifest.get("metrics", {}).get("members") or [{}]
    names = {("reward" if i == 0 else f"reward-{i}"): d for i, d in enumerate(dirs)}
    return names, [(r.get("reward_mean", 0.0), r.get("reward_std", 1.0)) for r in rows]


def fp32_head(head: nn.Module) -> nn.Module:
    """A scalar score head (a peft `modules_to_save` wrapper with its copies, or a plain Linear) in fp32 whatever the
    base's dtype, its input cast to its dtype by a forward pre-hook: the score is computed in fp32. peft upcasts LoRA
    weights to fp32 (autocast_adapter_dtype) but not `modules_to_save` heads, and on a bf16 base a small AdamW step on
    a bf16 head rounds away (tiny base, 4 steps at lr 2e-5: at most a third of its weights moved). An fp32 head is
    left as it is, bit for bit. The rm stage trains its head so, PPO its value head (and scores with its reward head
    so)."""
    head.float()
    if not getattr(head, "_input_to_head_dtype", False):
        def input_to_head_dtype(module, args):
            if args and torch.is_tensor(args[0]):
                return (args[0].to(next(module.parameters()).dtype), *args[1:])

        head.register_forward_pre_hook(input_to_head_dtype)
        head._input_to_head_dtype = True
        forward = head.forward

        def forward_without_autocast(*args, **kwargs):  # a launch's bf16 autocast would run the fp32 Linear in bf16
            device = args[0].device.type if args and torch.is_tensor(args[0]) else "cpu"
            with torch.autocast(device, enabled=False):
                return forward(*args, **kwargs)

        head.forward = forward_without_autocast
    return head


def head_output(lm, hidden: torch.Tensor) -> torch.Tensor:
    """The active adapter's scalar `score` head on hidden states, [..., H] -> [...] float. The heads may be fp32 on a
    bf16 base (fp32_head; the stack's slot), so the hidden state is cast to the head's dtype first."""
    dtype = next(lm.score.parameters()).dtype
    return lm.score(hidden.to(dtype)).squeeze(-1).float()


# Where peft keeps a named adapter's own tensors: `...q_proj.lora_A.<name>.weight`, `...score.modules_to_save.<name>.weight`.
ADAPTER_PARAM_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                         "modules_to_save")


def adapter_of(param_name: str) -> str | None:
    """The adapter a parameter belongs to (the name after its marker); None for the base model's weights."""
    parts = param_name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in ADAPTER_PARAM_MARKERS:
            return parts[i + 1]
    return None


class AdapterStack:
    def __init__(self, peft_model, trainable: tuple[str, ...]):
        self.model = peft_model
        self.trainable = tuple(trainable)
        self.frozen: set[int] = set()  # ids of adapter parameters kept frozen although their adapter trains (freeze())
        self.active = None
        self.ensembles: dict[str, tuple[list[str], list[tuple[float, float]]]] = {}
        self.pooling: dict[str, str] = {}  # adapter -> its score pooling (score_pooling.json; 'last' without one)

    def add_ensemble(self, name: str, members: list[str], member_stats: list[tuple[float, float]]) -> None:
        """From now on scores(name) is ensemble_score over these loaded adapters (name itself may be one of them)."""
        if len(members) > 1:
            self.ensembles[name] = (list(members), list(member_stats))

    @classmethod
    def build(cls, profile, tokenizer, adapters: dict[str, str | Path], trainable: tuple[str, ...] = (),
              base_model=None) -> "AdapterStack":
        """`adapters`: name -> PEFT adapter folder, loaded in order; names in `trainable` get gradients."""
        from peft import PeftModel

        base = base_model if base_model is not None else load_base(profile, tokenizer)
        hidden = hidden_size_of(base.config)
        first = next(base.parameters())  # the slot lives where the base does (a GPU for a 4-bit base)
        # In fp32 whatever the base's dtype: every adapter's copy of the head is made from the slot and loaded into it,
        # and the rm stage saves heads trained in fp32 (fp32_head); a bf16 slot would round them. head_output casts
        # the hidden state up to it.
        base.score = nn.Linear(hidden, 1, bias=False, dtype=torch.float32, device=first.device)
        names = list(adapters)
        for name in names:
            check_adapter(adapters[name], base.config, what=name)
        pm = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0], is_trainable=names[0] in trainable)
        for name in names[1:]:
            pm.load_adapter(str(adapters[name]), adapter_name=name, is_trainable=name in trainable)
        stack = cls(pm, trainable)
        stack.pooling = {name: read_pooling(adapters[name]) for name in names}
        stack.use(names[0])
        return stack

    def add_adapter(self, name: str, config) -> None:
        self.model.add_adapter(name, config)
        self._restore_trainable()

    def use(self, name: str) -> None:
        """Activate an adapter. set_adapter freezes every other adapter, so restore the trainable set after."""
        if self.active != name:
            self.model.set_adapter(name)
            self.active = name
            self._restore_trainable()

    def _restore_trainable(self) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad = adapter_of(n) in self.trainable and id(p) not in self.frozen

    def freeze(self, name: str, modules: list[nn.Module]) -> None:
        """Keep adapter `name`'s parameters inside `modules` frozen from now on."""
        for m in modules:
            for n, p in m.named_parameters():
                if adapter_of(n) == name:
                    self.frozen.add(id(p))
        self._restore_trainable()

    def adapter_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of one adapter's own tensors (LoRA matrices, its copy of the score head)."""
        return [(n, p) for n, p in self.model.named_parameters() if adapter_of(n) == name]

    @property
    def causal_lm(self) -> nn.Module:
        return self.model.base_model.model

    def logits(self, name: str, input_ids, attention_mask, **kw) -> torch.Tensor:
        self.use(name)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits

    def hidden(self, name: str, input_ids, attention_mask) -> torch.Tensor:
        self.use(name)
        return backbone(self.causal_lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def values(self, name: str, input_ids, attention_mask) -> torch.Tensor:
        """Per-token scalar head output [B, T] (the value function)."""
        return head_output(self.causal_lm, self.hidden(name, input_ids, attention_mask))

    def ensemble_of(self, name: str) -> tuple[list[str], list[tuple[float, float]]]:
        """The adapters whose scores make up `name`'s, with their statistics: an ensemble's members (add_ensemble),
        else `name` alone (whose score ensemble_score leaves as it is)."""
        return self.ensembles.get(name, ([name], [(0.0, 1.0)]))

    def scores(self, name: str, input_ids, attention_mask, starts=None) -> torch.Tensor:
        """Sequence score [B] by the adapter's pooling (pool_scores; 'last' reads the last real token, as
        *ForSequenceClassification does; 'sum' the reply's tokens from `starts`); for an ensemble (add_ensemble),
        ensemble_score of its members' scores."""
        members, stats = self.ensemble_of(name)
        return ensemble_score(torch.stack([self._one_score(m, input_ids, attention_mask, starts) for m in members]), stats)

    def _one_score(self, name: str, input_ids, attention_mask, starts) -> torch.Tensor:
        return pool_scores(self.values(name, input_ids, attention_mask), input_ids, attention_mask,
                           self.causal_lm.config.pad_token_id, self.pooling.get(name, "last"), starts)

    def whole_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's tensors by state-dict name without a sharded base's weights (DTensors): what an adapter is
        saved from. peft gathers every DTensor of the state dict it is given (a collective), and the main process
        saves alone; the adapters and heads are whole on every rank. Read from named_parameters/buffers, not
        state_dict(): FSDP's state-dict hook reshards a unit kept gathered (the LM head), on the main process only,
        and the ranks' next forwards would then gather different units."""
        from itertools import chain

        from torch.distributed.tensor import DTensor

        return {name: t.detach() for name, t in chain(self.model.named_parameters(), self.model.named_buffers())
                if not isinstance(t, DTensor)}

    def save(self, name: str, out_dir: str | Path) -> Path:
        """Save one adapter as a stock PEFT folder (out_dir itself, not out_dir/name), replacing the folder whole by
        renames: a rewrite killed midway leaves the old folder (or it beside, as .NAME.old) or the new one, never the
        old run's files beside the new one's (they were copied in one by one)."""
        import shutil

        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_folder(out_dir)  # the main process saves, one launch a stage folder
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save_pretrained(str(tmp), selected_adapters=[name], state_dict=self.whole_state_dict())
            replace_folder(tmp / name if (tmp / name).is_dir() else tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir
