"""The measured tables of README.md and docs/ are what bench/results/*.json say: a table
edited by hand, or a results file re-measured without `make tables`, fails here."""

import json

import pytest

from bench import tables


def marked_tables() -> list[str]:
    return [m.group("name") for document in tables.DOCUMENTS for m in tables.MARKER.finditer(document.read_text())]


def test_every_table_in_the_docs_matches_its_results_file(capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


def test_every_results_file_is_published_and_every_table_has_one(monkeypatch):
    names = marked_tables()
    assert set(names) <= set(tables.RENDERERS), names
    read = []
    load = tables.load
    monkeypatch.setattr(tables, "load", lambda name: read.append(name) or load(name))
    for name in names:
        tables.RENDERERS[name]()  # its results file exists and holds what the table shows
    produced = {p.stem for p in tables.RESULTS.glob("*.json")}
    assert produced <= set(read), f"results files no table shows: {sorted(produced - set(read))}"


def test_a_hand_edited_or_stale_table_is_reported(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "head_memory.json").write_text(json.dumps({"x": 1}))
    document = tmp_path / "doc.md"
    monkeypatch.setattr(tables, "RESULTS", results)
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "DOCUMENTS", [document])
    monkeypatch.setitem(tables.RENDERERS, "head_memory", lambda: f"x = {tables.load('head_memory')['x']}\n")
    document.write_text("intro\n<!-- table: head_memory -->\nx = 1\n<!-- /table -->\nend\n")
    assert tables.main(["--check"]) == 0
    document.write_text("intro\n<!-- table: head_memory -->\nx = 2\n<!-- /table -->\nend\n")  # typed by hand
    assert tables.main(["--check"]) == 1
    assert tables.main([]) == 0 and "x = 1\n" in document.read_text() and document.read_text().endswith("end\n")
    (results / "head_memory.json").write_text(json.dumps({"x": 3}))  # re-measured, not regenerated
    assert tables.main(["--check"]) == 1
    (results / "head_memory.json").unlink()
    with pytest.raises(FileNotFoundError, match="run the benchmark"):
        tables.main(["--check"])
