from tests.fake_stages import fake_stage

if __name__ == "__main__":
    # the real stage needs sft and rm and reads every policy stage the run has (stages/eval_compare.py)
    fake_stage("eval", ("sft", "rm"), may_read=("ppo", "grpo", "rloo", "reinforce_pp", "dpo"))
