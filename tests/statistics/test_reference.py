"""tunnelgraph.statistics.reference: a deprecated alias of tunnelgraph.testing for one release."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tunnelgraph.testing


@pytest.mark.parametrize("name", ["naive_a_matrix", "inbound_gradient"])
def test_reading_a_moved_name_warns_and_gives_the_testing_function(name: str) -> None:
    from tunnelgraph.statistics import reference

    with pytest.warns(DeprecationWarning, match=f"import {name} from tunnelgraph.testing"):
        value = getattr(reference, name)
    assert value is getattr(tunnelgraph.testing, name)


def test_other_names_are_missing() -> None:
    from tunnelgraph.statistics import reference

    with pytest.raises(AttributeError, match="no attribute 'a_matrix'"):
        reference.a_matrix  # noqa: B018


def test_importing_the_alias_does_not_import_testing() -> None:
    code = "import sys, tunnelgraph.statistics.reference; print('tunnelgraph.testing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
