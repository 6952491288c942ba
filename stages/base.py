"""Stage 0: the embedded default base model, trained from scratch on bundled public-domain books.

    make base            # python -m stages.base --config configs/base.yaml

There is no Hub on the machines this project is built on, so it ships its own small pretrained checkpoint
(models/tiny/, committed). This stage reproduces it: a byte-level BPE tokenizer with chat special tokens and
a chat template, then a small Llama trained nanoGPT-style on packed blocks of text. Two whole books are held
out for an honest perplexity.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pipeline.config import ConfigError, RunArgs, parse, read_utf8, resolve_path, to_dict
from pipeline.run import StageRun, atomic_write_json, main_guard, replace_folder, staging_folder

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# The EOS sits inside {% generation %}: the model learns to stop, and TRL's assistant-only loss covers it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class BaseConfig:
    # Data
    text_dir: str = field(default="data/pretrain/texts", metadata={"help": "Folder of .txt files to pretrain on."})
    heldout_books: list[str] = field(default_factory=lambda: ["alice", "bunny"], metadata={"help": "Files kept out for perplexity."})
    output_dir: str = field(default="models/tiny", metadata={"help": "Where the checkpoint goes (committed)."})
    # Tokenizer
    vocab_size: int = 4096
    # Model (Llama): ~3.3M parameters with these numbers
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    max_position_embeddings: int = 1024
    dropout: float = field(default=0.0, metadata={"help": "Attention dropout; under one epoch of data it only slows learning."})
    # Optimisation (nanoGPT-like: AdamW, warmup then cosine)
    block_size: int = 256
    batch_size: int = 16
    max_steps: int = 1200
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    optimizer: str = field(default="adamw", metadata={"help": "adamw | sgd | rmsprop"})
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads} (each head gets hidden_size / heads dimensions)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "block_size", "eval_every",
                     "eval_batches", "max_steps"):  # max_steps -1 is not TrainingArguments' "epochs" here: no training
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


OPTIMIZERS = ("adamw", "sgd", "rmsprop")


def book_files(cfg: BaseConfig) -> list:
    """The corpus: every .txt file of text_dir, with the held-out books among them (checked before anything is written)."""
    folder = resolve_path(cfg.text_dir)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ConfigError(f"text_dir {cfg.text_dir} holds no .txt files: point --text_dir at a folder of plain-text books")
    missing = sorted(set(cfg.heldout_books) - {f.stem for f in files})
    if missing:
        raise ConfigError(f"heldout_books {missing} are not in {cfg.text_dir} (books: {', '.join(f.stem for f in files)}): "
                          f"name books of text_dir, without .txt")
    if len(files) == len(set(cfg.heldout_books)):
        raise ConfigError(f"every book of {cfg.text_dir} is held out (heldout_books): leave some to train on")
    return files


def clean(text: str) -> str:
    """Join hard-wrapped lines into paragraphs; keep paragraph breaks."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      additional_special_tokens=SPECIAL_TOKENS[3:])
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.model_max_length = 1024
    return wrapped


def blocks(ids: list[int], size: int) -> torch.Tensor:
    n = len(ids) // (size + 1)
    return torch.tensor(ids[: n * (size + 1)], dtype=torch.long).view(n, size + 1)


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be adamw, sgd or rmsprop, not {name!r}")


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batches: int, batch_size: int) -> float:
    model.eval()
    losses = []
    for i in range(min(batches, math.ceil(len(data) / batch_size))):
        x = data[i * batch_size : (i + 1) * batch_size]
        losses.append(model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item())
    model.train()
    return sum(losses) / len(losses)


def main(cfg: BaseConfig, run: RunArgs) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    stage = StageRun("base", run.run, run.runs_dir)
    files = book_files(cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. Data: every book cleaned; two books held out whole. All of it checked before the run folder is touched.
    books = {f.stem: clean(read_utf8(f, str(f))) for f in files}
    train_texts = [t for name, t in books.items() if name not in cfg.heldout_books]
    heldout_texts = [t for name, t in books.items() if name in cfg.heldout_books]

    # 2. Tokenizer
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)

    def encode(texts):
        ids = []
        for t in texts:
            ids += [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids

    train_ids, heldout_ids = encode(train_texts), encode(heldout_texts)
    train_data = blocks(train_ids, cfg.block_size)
    heldout_data = blocks(heldout_ids, cfg.block_size)
    for what, data, ids in (("training", train_data, train_ids), ("held-out", heldout_data, heldout_ids)):
        if len(data) == 0:
            raise ConfigError(f"the {what} books hold {len(ids)} tokens, less than one block of block_size "
                              f"{cfg.block_size}: give longer books (heldout_books, text_dir) or a smaller --block_size")
    out = resolve_path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {cfg.output_dir} is a file: name a folder for the new base")
    if out.is_dir() and any(out.iterdir()) and not (out / "training_report.json").is_file():
        raise ConfigError(f"output_dir {cfg.output_dir} holds files that are not a base make base wrote (no "
                          f"training_report.json), which the new base would replace: name a new or empty folder")
    stage.prepare({"base": to_dict(cfg), "run": to_dict(run)})
    print(f"train tokens {len(train_ids):,}, held-out tokens {len(heldout_ids):,}, vocab {len(tokenizer)}")

    # 3. Model
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=cfg.dropout, tie_word_embeddings=False,
        # pad_token_id in the config: reward models read the score at the last non-pad token.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")

    # 4. Train: random blocks, warmup + cosine decay.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = make_optimizer(cfg.optimizer, [{"params": decay, "weight_decay": cfg.weight_decay},
                                         {"params": no_decay, "weight_decay": 0.0}], cfg.learning_rate, cfg.weight_decay)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.learning_rate * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(cfg.seed)
    history, t0, tokens_seen = [], time.time(), 0
    model.train()
    bar = tqdm(range(cfg.max_steps), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(len(train_data), (cfg.batch_size,), generator=gen)
        x = train_data[idx]
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += x[:, :-1].numel()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / (time.time() - t0):.0f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            heldout = evaluate(model, heldout_data, cfg.eval_batches, cfg.batch_size)
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "heldout_loss": round(heldout, 4)})
            tqdm.write(json.dumps(history[-1]))
    train_time = time.time() - t0

    # 5. Save in Hugging Face format, with a report of how it was made and how good it is: written beside the old
    # base and swapped in whole (a kill midway left the committed models/tiny half old, half new).
    saving = staging_folder(out)
    shutil.rmtree(saving, ignore_errors=True)
    model.save_pretrained(saving, safe_serialization=True)
    tokenizer.save_pretrained(saving)
    heldout_loss = evaluate(model, heldout_data, len(heldout_data), cfg.batch_size)
    samples = sample_continuations(model, tokenizer)
    metrics = {
        "parameters": n_params, "train_tokens_available": len(train_ids), "tokens_seen": tokens_seen,
        "heldout_loss": round(heldout_loss, 4), "heldout_perplexity": round(math.exp(heldout_loss), 2),
        "train_time_s": round(train_time, 1), "tokens_per_s": round(tokens_seen / train_time, 1),
        "history": history,
    }
    atomic_write_json(saving / "training_report.json", {"config": to_dict(cfg), "metrics": metrics, "samples": samples})
    (saving / "README.md").write_text(model_card(to_dict(cfg), metrics, samples))
    replace_folder(saving, out)
    for s in samples:
        print(f"\n>>> {s['prompt']}{s['continuation']}")
    print(f"\nheld-out perplexity {metrics['heldout_perplexity']} ({', '.join(cfg.heldout_books)}), "
          f"{metrics['tokens_per_s']} tokens/s, {train_time / 60:.1f} min")
    stage.finish({"model": out}, {k: v for k, v in metrics.items() if k != "history"}, {"base": to_dict(cfg)})
    return metrics


def model_card(cfg: dict, metrics: dict, samples: list[dict]) -> str:
    """The base's own model card: what it is, what it read, how good it is, and its license (the books are public
    domain, the code Apache-2.0), which `make publish` gives the adapters trained on it."""
    sample = samples[0]["prompt"] + samples[0]["continuation"] if samples else ""
    return "\n".join([
        "---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation", "language:", "- en",
        "---", "", "# The embedded tiny base", "",
        f"A Llama ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, "
        f"vocab {cfg['vocab_size']}: {metrics['parameters'] / 1e6:.1f}M parameters) pretrained from scratch by "
        f"`make base` (stages/base.py) on the public-domain children's books of data/pretrain/ ({cfg['max_steps']} "
        f"steps of {cfg['batch_size']} x {cfg['block_size']} tokens, {metrics['tokens_seen']:,} tokens; seed "
        f"{cfg['seed']}). Held-out perplexity {metrics['heldout_perplexity']} on {', '.join(cfg['heldout_books'])}.",
        "", "It writes fluent-looking nonsense, which is all a model this size can do:", "",
        f"> {' '.join(sample.split())}", "",
        "Its tokenizer has chat special tokens and a chat template, so every stage of the pipeline runs on it in "
        "minutes. License: Apache-2.0 (the books it read are in the public domain).", ""])


@torch.no_grad()
def sample_continuations(model, tokenizer, max_new_tokens: int = 40) -> list[dict]:
    model.eval()
    prompts = ["Once upon a time", "The little rabbit", "Alice said to the Queen,", "In the morning the children"]
    torch.manual_seed(0)
    out = []
    for p in prompts:
        ids = tokenizer(tokenizer.bos_token + p, add_special_tokens=False, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50,
                             pad_token_id=tokenizer.pad_token_id)
        out.append({"prompt": p, "continuation": tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)})
    return out


def CONFIG_CLASSES():
    return (BaseConfig, RunArgs)


if __name__ == "__main__":
    main_guard(lambda: main(*parse(CONFIG_CLASSES())))
