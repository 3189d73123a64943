"""tools/layout_figures.py: the layout keeps no import circle (function-level imports included)."""
from pathlib import Path

from tools.layout_figures import ROOT, circles, import_graph, sources


def test_the_project_has_no_import_circle():
    assert circles(import_graph(sources(ROOT))) == []


def test_a_circle_through_a_function_level_import_is_found(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import thing\n")
    (tmp_path / "pkg" / "b.py").write_text("def thing():\n    from pkg.a import x\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    assert circles(import_graph(sources(tmp_path))) == [["pkg.a", "pkg.b"]]
