"""Gold scores of one policy on held-out prompts, for the benchmarks' gold gain (bench/harness.py gold_gain).

    python -m bench.gold --policy sft=models/tiny,runs/x/sft/adapter --policy grpo=models/tiny,runs/x/grpo/adapter \
        --prompts heldout.jsonl --out gold.json

Every policy (the SFT start, ours after training, the peer's after training) goes through this one function, in
a process of the harness's own (its memory and time count towards no side): the adapter merged into its base, `samples` responses per prompt sampled with pipeline.generation
(fixed seed, the training temperature and response length, stopping at EOS), scored by the gold judge (VADER
sentiment by default, pipeline/judges.py). The same seed gives every policy the same sample slots, so the scores
pair up by index. With --reference NAME every other policy also gets its KL to that one (the SFT start) on its own
samples, measured as `make eval` measures it (stages.eval.sequence_kl: exact over the vocabulary, at the sampling
temperature, summed over the response): how far each side moved for its gain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class TwoPolicies:
    """What stages.eval.sequence_kl reads of an AdapterStack (`.model`, `.logits(name, ...)`), over two merged models."""

    def __init__(self, models: dict):
        self.models, self.model = models, next(iter(models.values()))

    def logits(self, name: str, input_ids, attention_mask, **kw):
        return self.models[name](input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits


def load_policy(base: str, adapter: str | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def score_policy(model, tokenizer, prompts_file: str, samples: int, seed: int, max_new_tokens: int,
                 temperature: float, judge, reference=None) -> dict:
    """Gold scores of `samples` responses per prompt; with a `reference` model, each response's KL to it."""
    from pipeline.generation import SamplingConfig, encode_prompts, generate
    from pipeline.judges import judge_scores
    from stages.eval import sequence_kl

    prompts = [json.loads(line)["prompt"] for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    prompts = [p for p in prompts for _ in range(samples)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, generation_batch_size=64)
    gens = generate(model, tokenizer, encode_prompts(tokenizer, prompts), sampling, generator_seed=seed)
    out = {"scores": judge_scores(judge, prompts, gens.texts), "texts": gens.texts, "judge": judge.name,
           "samples_per_prompt": samples, "seed": seed}
    if reference is not None:
        pair = TwoPolicies({"policy": model, "reference": reference})
        out["kl"] = sequence_kl(pair, "policy", "reference", {"gens": gens}, 16, temperature)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", action="append", required=True,
                    help="NAME=BASE[,ADAPTER]: a model folder and the LoRA adapter on it (none: the base itself).")
    ap.add_argument("--prompts", required=True, help="jsonl of {'prompt': [messages]} rows.")
    ap.add_argument("--samples", type=int, default=4, help="Responses per prompt.")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--judge", default="sentiment")
    ap.add_argument("--reference", default=None, help="NAME of the policy every other one gets its KL to.")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from pipeline.judges import load_judge

    torch.set_num_threads(1)
    judge = load_judge(a.judge)
    specs = {}
    for spec in a.policy:
        name, _, paths = spec.partition("=")
        base, _, adapter = paths.partition(",")
        specs[name] = (base, adapter or None)
    if a.reference is not None and a.reference not in specs:
        raise SystemExit(f"error: --reference {a.reference}: not one of the --policy names {sorted(specs)}")
    reference = load_policy(*specs[a.reference]) if a.reference else None
    res = {}
    for name, (base, adapter) in specs.items():
        tokenizer = AutoTokenizer.from_pretrained(base)  # every base folder here carries the tokenizer and template
        model = reference if name == a.reference else load_policy(base, adapter)
        res[name] = {"base": str(base), "adapter": adapter,
                     **score_policy(model, tokenizer, a.prompts, a.samples, a.seed, a.max_new_tokens, a.temperature,
                                    judge, None if name == a.reference else reference)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
