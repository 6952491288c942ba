"""Run under `accelerate launch` with configs/accelerate/fsdp_cpu2.yaml by tests/test_dpo.py: DPO's SFT policy
(stages.dpo.sft_policy) on a base sharded by FSDP2 over the ranks, its weights gathered whole and saved by the main
process, for the test to compare with peft's merge_and_unload of the whole base.

    python -m tests.merge_sharded_check PROFILE SFT_ADAPTER OUT.pt
"""

from __future__ import annotations

import sys

import torch


def main(profile: str, sft_adapter: str, out: str) -> None:
    from pipeline.models import load_tokenizer, profile_from
    from pipeline.sharding import full_state_dict, is_sharded, process_state, take_over_from_accelerate
    from stages.dpo import sft_policy

    shard = take_over_from_accelerate()
    state = process_state()
    prof = profile_from(profile)
    policy = sft_policy(prof, load_tokenizer(prof), sft_adapter, shard=shard)
    weights = full_state_dict(policy)  # a collective: every rank
    if state.is_main_process:
        torch.save({"world": state.num_processes, "sharded": is_sharded(policy), "weights": weights}, out)
    state.wait_for_everyone()


if __name__ == "__main__":
    from pipeline.report import destroy_distributed

    main(*sys.argv[1:])
    destroy_distributed()  # as the stages' main_guard: a gloo rank exiting with its group can SIGABRT
