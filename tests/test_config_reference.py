"""The configuration reference is generated from the typed config: every key, its type, its default."""

import re

from pydantic import BaseModel

from recsys_metric.config import Config, TrainConfig
from recsys_metric.config_reference import _inline_markdown, config_keys, config_reference_markdown


def _leaf_fields(model: type[BaseModel], prefix: str = ""):
    for key, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaf_fields(field.annotation, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", field


def test_every_key_has_a_heading_with_its_anchor_and_a_docstring():
    page = config_reference_markdown()
    keys = config_keys()
    assert len(keys) == len(set(keys)) == len(list(_leaf_fields(Config)))
    for key in keys:
        assert f"`{key}` {{ #{key.replace('.', '-')} }}" in page, key
    for key, field in _leaf_fields(Config):
        # A new field without a docstring would show "(undocumented)": config.py promises one per key.
        assert field.description, f"{key} has no docstring"
    assert "(undocumented)" not in page


def test_a_key_shows_its_type_bounds_default_and_its_docstring_as_markdown():
    page = config_reference_markdown()
    block = page.split("### `train.epochs` { #train-epochs }\n\n", 1)[1].split("\n###", 1)[0]
    assert block.startswith(f"type: `int (>= 1)`; default: `{TrainConfig().epochs}`\n\n")
    negatives = page.split("### `train.negatives` { #train-negatives }\n\n", 1)[1]
    assert negatives.startswith('type: `int (>= 1) | "auto"`; default: `"auto"`')
    assert "`n_items // 500` clipped" in negatives and "``" not in negatives.split("###")[0]
    assert 'type: `list[str]`; default: `["dislike", "skip", "thumbs_down", "hide", "return"]`' in page
    assert "type: `int | null (>= 1)`; default: `20000`" in page  # eval.validation_max_users


def test_sections_follow_the_config_and_nested_sections_nest():
    page = config_reference_markdown(level=2)
    sections = re.findall(r"^## `(\w+)`", page, flags=re.M)
    assert sections == list(Config.model_fields)
    assert "### `data.columns` { #data-columns }" in page
    assert "#### `data.columns.user_id` { #data-columns-user_id }" in page


def test_sphinx_markup_becomes_markdown():
    assert _inline_markdown("see ``x`` and :meth:`negatives_for`") == "see `x` and `negatives_for`"
    assert _inline_markdown(":func:`~recsys_metric.train.fit`") == "`fit`"
