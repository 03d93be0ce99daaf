"""workflow/report/workflow.rst, Snakemake's report text, rendered as `snakemake --report` renders it
(Jinja with trim_blocks and lstrip_blocks, then docutils to HTML): no docutils system message, and
the runs in a table, one row each, for one run and for several."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import yaml
from docutils import nodes
from docutils.core import publish_doctree, publish_parts

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "workflow" / "report" / "workflow.rst"


def render(config: dict) -> str:
    class Snakemake:  # what the template sees as `snakemake`, as in snakemake.report.auto_report
        pass

    Snakemake.config = config
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(TEXT.read_text()).render(snakemake=Snakemake, categories={}, files={})


def system_messages(rst: str) -> list[str]:
    # report_level 5 keeps docutils from printing them; they stay in the document tree.
    tree = publish_doctree(rst, settings_overrides={"report_level": 5, "halt_level": 5})
    return [f"{m['type']} line {m.get('line')}: {m.astext()}" for m in tree.findall(nodes.system_message)
            if m["level"] >= 2]


def run_table_rows(rst: str) -> list[list[str]]:
    tree = publish_doctree(rst, settings_overrides={"report_level": 5})
    tables = list(tree.findall(nodes.table))
    assert len(tables) == 1, "expected one table of runs"
    return [[entry.astext() for entry in row.findall(nodes.entry)] for row in tables[0].findall(nodes.row)]


def shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("config_file, runs", [
    ("config.yaml", ["default"]),
    ("sweep.yaml", ["sgd-b32", "sgd-b256", "lars-b256"]),
])
def test_runs_render_as_a_table_without_system_messages(config_file, runs):
    config = shipped(config_file)
    config.setdefault("report", {"projection_devices": 2048})
    rst = render(config)
    assert system_messages(rst) == []
    rows = run_table_rows(rst)
    assert rows[0][:4] == ["run", "model", "train crop", "global batch"]
    assert [row[0] for row in rows[1:]] == runs
    first = config["runs"][runs[0]]
    assert rows[1][1:4] == [first["model"], f"{first['image_size']} px", str(first["batch_size"])]
    html = publish_parts(rst, writer="html")["html_body"]
    assert "system-message" not in html


def test_the_check_sees_a_run_list_joined_to_its_sentence():
    """What the old template produced: the list glued to the sentence before it."""
    broken = ("The runs of this workflow:\n- ``default``: resnet18 at 48 px, global batch\n"
              "  64, lars at peak LR 2.0.\n")
    assert any("Unexpected indentation" in message for message in system_messages(broken))
