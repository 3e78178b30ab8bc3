"""docs/features.md lists exactly the columns the code produces, with their specs."""

from pathlib import Path

from xdpml.agent import features

DOC = Path(__file__).resolve().parents[2] / "docs" / "features.md"


def test_feature_doc_is_generated_from_specs():
    text = DOC.read_text()
    assert features.markdown().strip() in text, "regenerate: python -m xdpml.agent.features"
