"""tools/mutants.py's list stays honest: each mutant changes exactly one place of a file that exists, and names tests
that exist, so a refactor cannot turn it into a no-op that `make mutants` would report as killed or skip."""

import shlex

from tools.mutants import MUTANTS, REPO


def test_every_mutant_changes_one_place_and_names_real_tests():
    names = [m[0] for m in MUTANTS]
    assert len(names) == len(set(names))
    for name, rel, old, new, selection in MUTANTS:
        assert old != new, name
        assert (REPO / rel).read_text().count(old) == 1, f"{name}: its text must occur once in {rel}"
        files = [w for w in shlex.split(selection) if w.startswith("tests/")]
        assert files and all((REPO / f).is_file() for f in files), name
