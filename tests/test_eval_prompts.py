"""One prompt format: a class reads at evaluation as its cells' texts read in pre-training."""

from __future__ import annotations

import json

import yaml

from langcell.build_sclibrary.config import TextConfig
from langcell.build_sclibrary.texts import TermInfo, TextBuilder
from langcell.eval.prompts import class_text
from langcell.pretrain.engine import library_class_prompt

REPO_TEXTS = "configs/build/texts.yaml"


def test_trained_prompt_is_the_librarys_template(tmp_path):
    config = TextConfig(**yaml.safe_load(open(REPO_TEXTS)))
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {"texts": config.__dict__}}))
    prompt = library_class_prompt(tmp_path)
    terms = {"CL:1": TermInfo("B cell", "A lymphocyte  of B lineage", [], []), "CL:2": TermInfo("platelet", "", [], [])}
    built = TextBuilder(terms, config)
    assert class_text(prompt, "B cell", "A lymphocyte  of B lineage") == built.describe("cell_type", "B cell", "CL:1") \
        == "cell type: B cell. A lymphocyte of B lineage."
    assert class_text(prompt, "platelet", "") == built.describe("cell_type", "platelet", "CL:2")
    # A free-text class name gets the same template, without a definition.
    assert class_text(prompt, "my odd cells", "") == "cell type: my odd cells."


def test_library_without_text_config_records_none(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "langcell-sclibrary/1"}))
    assert library_class_prompt(tmp_path) is None
