"""Class texts at evaluation: a class name and definition in the template the model was trained
with (`model.class_prompt`, recorded by the export; LangCell's own for its release).

A trained template comes from the library's text config and is filled as `langcell build` fills
it (definition as one-space sentences, result stripped), so a class reads at evaluation exactly
as its cells' texts read in pre-training.
"""

from __future__ import annotations

from langcell.pretrain.export import LANGCELL_CLASS_PROMPT


def model_prompt(model) -> dict:
    return getattr(model, "class_prompt", None) or LANGCELL_CLASS_PROMPT


def class_text(prompt: dict, label: str, definition: str) -> str:
    if prompt.get("definition_as_sentence"):
        from langcell.build_sclibrary.texts import as_sentence

        definition = as_sentence(definition) if definition else ""
    if definition:
        text = prompt["template"].format(label=label, definition=definition)
    else:
        text = prompt["template_no_definition"].format(label=label)
    return text.strip() if prompt.get("definition_as_sentence") else text
