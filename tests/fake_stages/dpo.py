from tests.fake_stages import fake_stage

if __name__ == "__main__":
    fake_stage("dpo", ("sft",))
