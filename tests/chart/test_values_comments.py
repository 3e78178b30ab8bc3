"""Every key in helm/xdpml/values.yaml carries a helm-docs `# --` comment."""

from __future__ import annotations

from pathlib import Path

import yaml

VALUES = Path(__file__).resolve().parents[2] / "helm" / "xdpml" / "values.yaml"


def undocumented_keys(text: str) -> list[str]:
    """Dotted paths of block-mapping keys whose comment block above lacks a `# --` line.

    Keys inside sequences or flow mappings (`{...}`) are example data, not settings.
    A key's comment block is the run of comment lines directly above it.
    """
    lines = text.splitlines()
    missing: list[str] = []

    def walk(node: yaml.Node, path: str) -> None:
        if not isinstance(node, yaml.MappingNode) or node.flow_style:
            return
        for key, value in node.value:
            dotted = f"{path}.{key.value}" if path else key.value
            i = key.start_mark.line - 1
            block = []
            while i >= 0 and lines[i].strip().startswith("#"):
                block.append(lines[i].strip())
                i -= 1
            if not any(c.startswith("# --") for c in block):
                missing.append(dotted)
            walk(value, dotted)

    walk(yaml.compose(text), "")
    return missing


def test_every_values_key_has_a_doc_comment():
    assert undocumented_keys(VALUES.read_text()) == []


def test_checker_finds_a_missing_comment():
    text = "# -- documented\na: 1\nb:\n  # -- inner\n  c: 2\n  d: [1, 2]\n  # just a note\n  e: {x: 1}\n"
    assert undocumented_keys(text) == ["b", "b.d", "b.e"]
