"""The adapters a benchmark's PPO runs start from, on a base of its own: a fresh SFT LoRA and a seeded reward LoRA,
written as the sft and rm stages write theirs (bench/bench_shard.py's random-init Llama, bench/run_ours.py's peer base)."""

from __future__ import annotations

from pathlib import Path

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # a Llama block's 7 projections


def seeded_sft_and_reward(base_dir: Path, work: Path, lora: dict, seed: int, score_from: Path | None = None):
    """work/sft: a LoRA policy on the base at `base_dir` (seed; B = 0, so policy = reference = the base at the start);
    work/rm: a SEQ_CLS reward LoRA on it (seed + 1; B random, so the reward varies with the text) whose `score` head is
    random, or the one of the reward model at `score_from` (a standalone model of the same base). Each with the base's
    tokenizer and fingerprinted on `base_dir`. `lora`: LoraConfig's r, alpha, dropout and targets for both. Returns the
    reward model (peft), for a caller that merges it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.models import save_fingerprint

    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    m = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    m.save_pretrained(work / "sft")
    tok.save_pretrained(work / "sft")
    save_fingerprint(work / "sft", base.config, str(base_dir))
    del m, base  # one copy of the base at a time
    torch.manual_seed(seed + 1)
    rb = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    rb.config.pad_token_id = tok.pad_token_id
    if score_from is not None:
        peer = AutoModelForSequenceClassification.from_pretrained(score_from, num_labels=1)
        rb.score.weight.data.copy_(peer.score.weight.data)
        del peer
    m = get_peft_model(rb, LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, **lora))
    m.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    save_fingerprint(work / "rm", rb.config, str(base_dir))
    return m
