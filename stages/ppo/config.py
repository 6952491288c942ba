"""PPO hyper-parameters: one dataclass, one to one with configs/ppo.yaml (which says where each default comes from).

Names follow TRL 1.12's PPOConfig where the two share a meaning (kl_coef, cliprange, vf_coef, num_ppo_epochs,
num_mini_batches, response_length, missing_eos_penalty, ...), so a TRL user finds their knobs.
One update = per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches episodes per process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError
from pipeline.run import check_launched_folder

CHOICES = {
    "long_prompts": ("drop", "truncate", "error"),
    "reward_input": ("chat", "tokens"),
    "optim": ("adamw", "sgd", "rmsprop"),
    "report_to": ("none", "tensorboard", "trackio"),
    "critic_init": ("fit", "rm"),
    "advantage_estimator": ("gae", "grpo", "rloo", "reinforce_pp"),
    "loss_agg_mode": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "shard_base": ("auto", "true", "false"),
}
# The transformers schedulers stepped once per update: reduce_lr_on_plateau and greedy step on a metric, and
# warmup_stable_decay and the min_lr cosines need settings of their own. The first four span total_updates.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
SCHEDULERS_OVER_TOTAL = SCHEDULERS[:4]
# The run folder of each estimator: `make grpo` and `make ppo` keep their outputs apart.
STAGE_NAMES = {"gae": "ppo", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}


# logits / temperature: a logit of 40 over 1e-40 is past fp32 and bf16 (3.4e38), and the run trains on NaN
MIN_TEMPERATURE = 1e-4


@dataclass
class PPOConfig:
    YAML_BOOL_TEXT = ("shard_base",)  # texts that YAML reads as booleans (`shard_base: true`): pipeline.config takes them
    # Upstream (default: the sft and rm manifests of the run)
    sft_adapter: str | None = field(default=None, metadata={"help": "Policy/reference adapter; default: outputs.adapter of runs/<run>/sft."})
    reward_adapter: str | None = field(default=None, metadata={"help": "Reward/value adapter (SEQ_CLS); default: outputs.adapter of runs/<run>/rm."})
    # Data
    dataset_name: str | None = field(default=None, metadata={"help": "Your prompts (file, folder or Hub id) with a 'prompt' column; replaces prompts_file."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to read (a Hub id's, or a folder's by its files' names)."})
    prompts_file: str = field(default="data/prompts/oasst_ppo_prompts.jsonl", metadata={"help": "Bundled prompt set."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Share of prompts never trained on (for make eval)."})
    max_prompt_length: int = field(default=128, metadata={"help": "Prompt limit in tokens (after the chat template)."})
    long_prompts: str = field(default="drop", metadata={"help": "Prompts over the limit: drop | truncate (keep the end) | error."})
    # Rollout
    response_length: int = field(default=48, metadata={"help": "max_new_tokens of each response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature for rollouts (and in the log-probs)."})
    stop_at_eos: bool = field(default=True, metadata={"help": "Stop a response at EOS (false: always response_length tokens, and whatever follows an EOS is part of the reply the reward model scores, as in TRL with stop_token None)."})
    generation_batch_size: int = field(default=64, metadata={
        "help": "Rows (answers) per sampling call: each prompt is repeated num_samples_per_prompt times first."})
    forward_batch_size: int = field(default=64, metadata={"help": "Rows per no-grad scoring forward (ref, value, reward)."})
    # Batch arithmetic
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro-batch of the update passes."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per mini-batch (one optimizer step)."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per epoch over the rollout batch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    total_updates: int = field(default=48, metadata={"help": "PPO updates (rollout + optimisation rounds)."})
    # Reward
    reward_input: str = field(default="chat", metadata={"help": "chat: RM reads the chat-templated conversation, as it was trained; tokens: the policy's tokens."})
    normalize_reward: bool = field(default=True, metadata={"help": "(score - reward_mean) / reward_std with the rm manifest's stats."})
    reward_clip: float = field(default=5.0, metadata={"help": "Clip the (normalised) score to +-this; 0 = off."})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "Subtracted from the score of responses without a stop token (with stop_at_eos false: none anywhere in its "
                "response_length tokens, as TRL's missing_eos_penalty); 0 = off."})
    # KL
    # The KL in the reward is k1 (the log-ratio), the one estimator that is a KL penalty there; use_kl_loss's term is
    # k3. A kl_estimator setting had one value that could act, and was removed (REMOVED_KEYS).
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty coefficient (initial value if adaptive)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards kl_target (Ziegler et al. 2019)."})
    kl_target: float = field(default=6.0, metadata={"help": "Target per-sequence KL in nats for adaptive_kl."})
    kl_horizon: int = field(default=10000, metadata={"help": "Episodes over which adaptive_kl closes the gap."})
    # PPO
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = field(default=True, metadata={"help": "gae only: whiten the advantages over the batch. "
                                   "grpo and rloo normalise within each group, reinforce_pp whitens the batch itself."})
    whiten_rewards: bool = False
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus; entropy is always logged."})
    # Advantage estimator (verl's names): gae = PPO with a critic; the others are critic-free (no value adapter)
    advantage_estimator: str = field(default="gae", metadata={"help": "gae (PPO + critic) | grpo | rloo | reinforce_pp (critic-free)."})
    num_samples_per_prompt: int = field(default=1, metadata={"help": "Responses sampled per prompt (a group); grpo and rloo need >= 2."})
    grpo_normalize_std: bool = field(default=True, metadata={"help": "grpo: divide by the group's std; false with loss_agg_mode seq-mean-token-sum-norm = Dr. GRPO (Liu et al. 2025)."})
    loss_agg_mode: str = field(default="token-mean", metadata={"help": "How the policy loss sums its tokens (verl's names): token-mean (every token alike, DAPO) | seq-mean-token-mean (every answer alike, GRPO's paper) | seq-mean-token-sum-norm (/ rows x response_length, Dr. GRPO). The value loss is a token mean."})
    use_kl_loss: bool = field(default=False, metadata={"help": "KL to the reference as a loss term (k3, GRPO) instead of a penalty in the reward."})
    critic_init: str = field(default="fit", metadata={"help": "fit: the first rollout fits the value head (from the RM) to the shaped reward's scale by least squares; rm: the RM's raw scale, as is."})
    critic_warmup_updates: int = field(default=0, metadata={"help": "Updates that train only the value adapter (OpenRLHF freezing_actor_steps, verl critic_warmup)."})
    recompute_old_logprobs: bool | None = field(default=None, metadata={"help": "Old log-probs from a full forward instead of the sampling loop (OpenRLHF, verl); null = on unless the policy computes in fp32 (an fp32 base, no mixed precision, not 4-bit)."})
    value_trainable_layers: int = field(default=1, metadata={"help": "The value adapter trains its top N decoder layers + head (the rest stay as the RM left them, and their output is computed once per rollout); 0 = all layers."})
    # Optimiser
    optim: str = field(default="adamw", metadata={"help": "adamw | sgd | rmsprop"})
    learning_rate: float = 1e-4
    value_learning_rate: float | None = field(default=None, metadata={"help": "Default: learning_rate."})
    adam_epsilon: float = 1e-5
    weight_decay: float = 0.0
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Stepped once per update: linear | cosine | cosine_with_restarts | polynomial (these span total_updates) | constant | constant_with_warmup | inverse_sqrt."})
    warmup_updates: int = 0
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the joint policy+value gradient norm; 0 = off."})
    gradient_checkpointing: bool = False
    shard_base: str = field(default="auto", metadata={"help": "Shard the frozen base across processes with torch FSDP2: auto (when launched with an FSDP accelerate config) | true | false (every rank holds the whole base)."})
    # Checkpoints, logging
    keep_policy_every: int = field(default=0, metadata={"help": "Keep the policy adapter every N updates under policies/update-N/ (make eval's gold-vs-proxy curve); 0 = off."})
    save_every: int = field(default=10, metadata={"help": "Checkpoint every N updates (and at the end); 0 = only at the end."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint (error if there is none)."})
    auto_resume: bool = field(default=True, metadata={"help": "An interrupted run (checkpoint, no manifest) continues when restarted."})
    stop_after: int = field(default=0, metadata={"help": "Stop (with a checkpoint) after this many updates in this invocation; 0 = run to the end."})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | trackio (optional packages)."})
    sample_every: int = field(default=10, metadata={"help": "Print and keep a table of sample responses at the first update and every N-th; 0 = off."})
    num_samples: int = 4
    progress_bar: bool = True
    seed: int = 42

    def inert_settings(self, parsed: list) -> dict[str, str]:
        """Settings that would not act with the rest of the config (pipeline.config.parse refuses them when they are
        given on the command line): the value model's under a critic-free estimator (whitening its advantages too),
        grpo's std under another, gamma under a group's summed reward, adaptive_kl's without it."""
        inert = {}
        if self.advantage_estimator != "gae":
            why = f"advantage_estimator {self.advantage_estimator} trains no value model"
            inert.update({key: why for key in ("value_learning_rate", "vf_coef", "cliprange_value", "critic_init",
                                               "value_trainable_layers", "lam", "whiten_advantages")})
        if self.advantage_estimator != "grpo":
            inert["grpo_normalize_std"] = f"advantage_estimator {self.advantage_estimator} does not divide by a group's std"
        if self.advantage_estimator in ("grpo", "rloo"):  # a group's summed reward: gamma would discount only the log
            inert["gamma"] = f"advantage_estimator {self.advantage_estimator} compares each answer's summed reward"
        if not self.adaptive_kl:
            inert.update({key: "adaptive_kl is off (kl_coef stays fixed): set --adaptive_kl true too"
                          for key in ("kl_target", "kl_horizon")})
        return inert

    def __post_init__(self):
        if isinstance(self.shard_base, bool):  # YAML reads `shard_base: true` as a boolean
            self.shard_base = "true" if self.shard_base else "false"
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, not '{getattr(self, name)}'")
        # the folder first, in make's check and in the stage alike (both set PIPELINE_STAGE): `make ppo
        # PPO_ARGS="--advantage_estimator grpo"` is the wrong command, not a setting to fix
        check_launched_folder(self.stage_name, self.stage_folder_setting)
        for name in ("response_length", "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                     "num_ppo_epochs", "total_updates", "generation_batch_size", "forward_batch_size", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.value_trainable_layers < 0:
            raise ConfigError(f"value_trainable_layers must be >= 0 (0 = all layers), got {self.value_trainable_layers}")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.temperature < MIN_TEMPERATURE:
            raise ConfigError(f"temperature must be >= {MIN_TEMPERATURE} (not {self.temperature}): PPO's ratio needs the "
                              f"sampling distribution's log-probs, and logits divided by less overflow (inf, then NaN)")
        if self.adaptive_kl and self.kl_coef <= 0:
            raise ConfigError("adaptive_kl needs kl_coef > 0 as its starting value")
        # Ranges: a value outside them trains nonsense (a negative learning rate ascends the loss) rather than failing.
        ranges = {  # name: (low, high, low inclusive)
            "learning_rate": (0, None, False), "value_learning_rate": (0, None, False), "adam_epsilon": (0, None, False),
            "cliprange": (0, None, False), "cliprange_value": (0, None, False), "kl_target": (0, None, False),
            "kl_coef": (0, None, True), "vf_coef": (0, None, True), "entropy_coef": (0, None, True),
            "reward_clip": (0, None, True), "missing_eos_penalty": (0, None, True), "max_grad_norm": (0, None, True),
            "weight_decay": (0, None, True), "gamma": (0, 1, True), "lam": (0, 1, True),
            "kl_horizon": (1, None, True), "warmup_updates": (0, None, True), "critic_warmup_updates": (0, None, True),
            "save_every": (0, None, True), "keep_policy_every": (0, None, True), "stop_after": (0, None, True), "sample_every": (0, None, True),
            "num_samples": (0, None, True),
        }
        for name, (low, high, inclusive) in ranges.items():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ConfigError(f"{name} must be a number, got {v!r}")
            if (v < low if inclusive else v <= low) or (high is not None and v > high):
                where = f"in [{low}, {high}]" if high is not None else (f">= {low}" if inclusive else f"> {low}")
                raise ConfigError(f"{name} must be {where}, got {v}")
        k = self.num_samples_per_prompt
        if k < 1:
            raise ConfigError(f"num_samples_per_prompt must be at least 1, got {k}")
        if self.advantage_estimator in ("grpo", "rloo") and k < 2:
            raise ConfigError(f"advantage_estimator {self.advantage_estimator} compares answers to the same prompt: "
                              f"set num_samples_per_prompt to 2 or more (got {k})")
        if k > 1 and (self.per_device_train_batch_size % k or self.local_batch_size % (k * self.num_mini_batches)):
            raise ConfigError(f"num_samples_per_prompt={k} must divide per_device_train_batch_size "
                              f"({self.per_device_train_batch_size}) and every mini-batch, so that groups stay whole")
        if self.whiten_rewards and self.advantage_estimator != "gae":  # unshifted whitening leaves zero-reward
            # tokens non-zero: a row's summed (or discounted) reward then grows with its length, and the group
            # comparison turns equal scores into advantages (verl and TRL whiten rewards only for PPO's critic)
            raise ConfigError(f"whiten_rewards needs a critic: only advantage_estimator gae has one (got "
                              f"{self.advantage_estimator}, whose advantages normalise the scores themselves); set "
                              f"whiten_rewards: false")
        if self.critic_warmup_updates and self.advantage_estimator != "gae":
            raise ConfigError("critic_warmup_updates needs a critic: only advantage_estimator gae has one")
        if self.critic_warmup_updates >= self.total_updates:
            raise ConfigError(f"critic_warmup_updates ({self.critic_warmup_updates}) must be below total_updates "
                              f"({self.total_updates}): the policy would never train")
        if self.lr_scheduler_type not in SCHEDULERS:  # here, not when the trainer steps it after the first update
            raise ConfigError(f"lr_scheduler_type '{self.lr_scheduler_type}' is not a transformers scheduler PPO can "
                              f"step once per update (with no metric and no settings of its own): use one of "
                              f"{', '.join(SCHEDULERS)}")

    def check_kl_horizon(self, processes: int) -> None:
        """adaptive_kl moves kl_coef by up to 20% x episodes / kl_horizon an update (Ziegler et al.): past 100%, a
        coefficient below 0, whose reward pays the policy for drifting from the reference."""
        episodes = self.local_batch_size * processes
        if self.adaptive_kl and 0.2 * episodes >= self.kl_horizon:
            raise ConfigError(f"kl_horizon {self.kl_horizon} with adaptive_kl: an update of {episodes} episodes would "
                              f"move kl_coef by up to {0.2 * episodes / self.kl_horizon:.0%}, below 0 (a reward that "
                              f"pays for drifting from the reference): give a kl_horizon above {0.2 * episodes:g} "
                              f"(Ziegler et al. 10000)")

    @property
    def local_batch_size(self) -> int:
        """Episodes per update on one process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def has_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def prompt_group(self) -> int:
        """Answers that share one prompt forward in the scoring and update passes (rollout.pack's group): a group of
        the critic-free estimators. 1 with a critic (its top layers cache whole rows) or with gradient checkpointing
        (HF drops the KV cache there)."""
        k = self.num_samples_per_prompt
        return k if k > 1 and not self.has_critic and not self.gradient_checkpointing else 1

    @property
    def stage_name(self) -> str:
        return STAGE_NAMES[self.advantage_estimator]

    @property
    def stage_folder_setting(self) -> str:
        """The setting that picks stage_name, as an error names it (pipeline.run.check_launched_folder)."""
        return f"advantage_estimator {self.advantage_estimator}"

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.adaptive_kl
