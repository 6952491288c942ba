"""The order `make test` starts the suite's files in (tests/conftest.py): the longest first, so that neither pytest-xdist
worker runs a long file alone at the end while the other idles."""

from pathlib import Path

from tests.conftest import LONGEST_FILES_FIRST, files_longest_first

TESTS = Path(__file__).resolve().parent


def test_the_longest_files_start_first_then_the_most_tests():
    counts = {"tests/test_a.py": 3, "tests/test_b.py": 9, "tests/test_journey.py": 2, "tests/test_make.py": 67,
              "tests/test_c.py": 9}
    assert files_longest_first(list(counts), counts) == [
        "tests/test_journey.py", "tests/test_make.py", "tests/test_b.py", "tests/test_c.py", "tests/test_a.py"]


def test_every_file_named_longest_is_a_test_file_of_the_suite():
    assert len(set(LONGEST_FILES_FIRST)) == len(LONGEST_FILES_FIRST)
    assert [name for name in LONGEST_FILES_FIRST if not (TESTS / name).is_file()] == []


def test_collection_puts_each_file_in_that_order_and_keeps_its_own_tests_in_theirs():
    """The hook pytest calls (tests/conftest.py pytest_collection_modifyitems) applies the order to the collected
    tests: without it the suite ran in xdist's own order, which the test above would not notice."""
    from types import SimpleNamespace

    from tests.conftest import pytest_collection_modifyitems

    collected = ["tests/test_a.py::t1", "tests/test_journey.py::j1", "tests/test_a.py::t2", "tests/test_b.py::b1",
                 "tests/test_journey.py::j2[x]", "tests/test_b.py::b2", "tests/test_b.py::b3"]
    items = [SimpleNamespace(nodeid=nodeid) for nodeid in collected]
    pytest_collection_modifyitems(None, items)
    assert [item.nodeid for item in items] == [
        "tests/test_journey.py::j1", "tests/test_journey.py::j2[x]",  # named longest
        "tests/test_b.py::b1", "tests/test_b.py::b2", "tests/test_b.py::b3",  # then the most tests: 3
        "tests/test_a.py::t1", "tests/test_a.py::t2"]
