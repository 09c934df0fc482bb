"""The wheel ships every subpackage and the Hydra configs (a missing entry in pyproject's explicit
package list would only show up on a user's `pip install .`)."""

import ast

from conftest import REPO


def test_every_subpackage_is_listed_in_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("packages = "))
    listed = set(ast.literal_eval(line.split("=", 1)[1].strip()))
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mrem_dist").rglob("__init__.py")}
    assert found | {"mrem_dist.conf"} == listed
    assert (REPO / "conf" / "config.yaml").is_file()
