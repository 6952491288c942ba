from stages.label.store import store_digest
from tests.fake_stages import fake_stage

if __name__ == "__main__":
    # like the real export, it records the digest of the store it exported (what `make rm`'s labels step compares)
    fake_stage("label-export", metrics=lambda stage: {"store_digest": store_digest(stage.dir.parent / "label" / "labels.sqlite")})
