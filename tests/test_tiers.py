"""The conftest's lists of test modules and tests (the extended tier CI leaves out, the
longest-first order) name modules and test functions that exist: a renamed test would
otherwise drop out of its tier silently."""

import ast

from tests.conftest import EXTENDED, LONGEST_FIRST, TESTS


def _test_functions(module) -> set[str]:
    tree = ast.parse((TESTS / module).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_listed_module_and_test_exists():
    for entry in sorted(EXTENDED) + LONGEST_FIRST:
        module, _, test = entry.partition("::")
        assert (TESTS / module).is_file(), entry
        if test:
            assert test.split("[")[0] in _test_functions(module), entry
