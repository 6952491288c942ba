"""`python -m stages.ppo --config configs/ppo.yaml` (or `accelerate launch ... -m stages.ppo ...`): parse, then run."""

from pipeline.run import main_guard
from stages.ppo import main, parse_args

if __name__ == "__main__":
    main_guard(lambda: main(*parse_args()))
