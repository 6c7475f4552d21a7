import pytest

from benchmarks.record import record_section


def test_record_replaces_only_its_own_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Ingest\nold ingest\n\n## Pre-training\nold pretrain\nline 2\n\n## Demo\nkeep\n")
    record_section("Pre-training", "new numbers\n", md)
    assert md.read_text() == "# Benchmarks\n\n## Ingest\nold ingest\n\n## Pre-training\nnew numbers\n\n## Demo\nkeep\n"
    record_section("Demo", "last", md)
    assert md.read_text().endswith("## Demo\nlast\n")
    with pytest.raises(RuntimeError, match="no '## Missing' section"):
        record_section("Missing", "x", md)


def test_record_subsection_replaces_or_appends_its_block_only(tmp_path):
    from benchmarks.record import record_subsection

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("## Ingest\nintro\n\n### Rows\nold rows\n\n### Census\nold census\n\n## Demo\nkeep\n")
    record_subsection("Ingest", "Rows", "new rows", md)
    assert md.read_text() == "## Ingest\nintro\n\n### Rows\nnew rows\n\n### Census\nold census\n\n## Demo\nkeep\n"
    record_subsection("Ingest", "Wide cells", "wide\n", md)
    assert md.read_text() == ("## Ingest\nintro\n\n### Rows\nnew rows\n\n### Census\nold census\n\n"
                              "### Wide cells\nwide\n\n## Demo\nkeep\n")
    with pytest.raises(RuntimeError, match="no '## Missing' section"):
        record_subsection("Missing", "x", "y", md)
