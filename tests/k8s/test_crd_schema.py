"""xdpml.kube.crd_schema: the API server's steps on a CRD schema (null pruning, defaults,
OpenAPI specifics, CEL rules), each pinned on a small CRD written for the purpose, with
the expected outcome worked out by hand from the Kubernetes documentation."""

from __future__ import annotations

import pytest

from xdpml.kube.crd_schema import CrdSchema, field_path

pytestmark = pytest.mark.timeout(30)

SCHEMA = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["port"],
            "x-kubernetes-validations": [
                {"rule": "self.port != 7", "message": "port 7 is refused", "fieldPath": ".port"},
                {"rule": "self.port != 8", "messageExpression": "'port ' + string(self.port) + ' is taken'"},
                {"rule": "self.port >= oldSelf.port", "message": "transition rule"},
            ],
            "properties": {
                "port": {"type": "integer"},
                "target": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "level": {"type": "string", "default": "info", "enum": ["info", "debug"]},
                "code": {"type": "string", "pattern": "^[a-z]+$", "description": "Lowercase letters."},
                "raw": {"type": "string", "pattern": "^[a-z]+$"},
                "ratio": {
                    "type": "number",
                    "minimum": 0,
                    "exclusiveMinimum": True,
                    "maximum": 1,
                    "x-kubernetes-validations": [{"rule": "self != 0.5", "message": "not one half"}],
                },
                "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                "routes": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "weight": {"type": "integer", "default": 1}},
                    },
                },
                "limits": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {"max": {"type": "integer", "default": 10}},
                    },
                },
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "nested": {"type": "object", "default": {}, "properties": {"depth": {"type": "integer", "default": 3}}},
            },
        },
    },
}
CRD = {
    "metadata": {"name": "things.example.com"},
    "spec": {"versions": [{"name": "v1", "schema": {"openAPIV3Schema": SCHEMA}}]},
}


@pytest.fixture(scope="module")
def crd():
    return CrdSchema(CRD, "v1")


def test_defaults_nulls_and_nested_defaults(crd):
    spec, errs = crd.validate(
        {"port": 80, "note": None, "level": None, "routes": [{"name": "a"}], "limits": {"x": {}}}, "spec"
    )
    assert errs == []
    # nullable keeps its null; a non-nullable null is pruned, then defaulted
    assert spec["note"] is None and spec["level"] == "info"
    assert spec["routes"] == [{"name": "a", "weight": 1}]  # defaults inside list items
    assert spec["limits"] == {"x": {"max": 10}}  # ... and inside map values
    assert spec["nested"] == {"depth": 3}  # a defaulted object gets its own defaults


def test_int_or_string_and_types(crd):
    assert crd.validate({"port": 1, "target": "http"}, "spec")[1] == []
    assert crd.validate({"port": 1, "target": 8080}, "spec")[1] == []
    (err,) = crd.validate({"port": 1, "target": 1.5}, "spec")[1]
    assert err == "spec.target: must be an integer or a string, not 1.5"
    (err,) = crd.validate({"port": 1, "level": "trace"}, "spec")[1]
    assert err == "spec.level: must be one of info, debug, not 'trace'"


def test_pattern_errors_say_the_form(crd):
    _, errs = crd.validate({"port": 1, "code": "A1", "raw": "A1"}, "spec")
    assert errs == [
        "spec.code: 'A1' is not valid: Lowercase letters.",
        "spec.raw: 'A1' is not valid: must match ^[a-z]+$",
    ]


def test_openapi_exclusive_minimum_is_boolean(crd):
    assert crd.validate({"port": 1, "ratio": 0.1}, "spec")[1] == []
    (err,) = crd.validate({"port": 1, "ratio": 0}, "spec")[1]
    assert err == "spec.ratio: must be > 0, not 0"


def test_list_types(crd):
    (err,) = crd.validate({"port": 1, "tags": ["a", "a"]}, "spec")[1]
    assert err == "spec.tags: has duplicate items"
    (err,) = crd.validate({"port": 1, "routes": [{"name": "a"}, {"name": "a", "weight": 2}]}, "spec")[1]
    assert err == "spec.routes[1]: duplicate entry for key name"


def test_unknown_fields_except_where_preserved(crd):
    _, errs = crd.validate({"port": 1, "prot": 2, "extra": {"anything": {"goes": 1}}}, "spec")
    assert errs == ["spec.prot: unknown field"]
    # metadata is ObjectMeta, validated by the API server itself
    _, errs = crd.validate({"apiVersion": "v1", "kind": "T", "metadata": {"labels": {"a": "b"}}, "spec": {"port": 1}})
    assert errs == []


def test_cel_messages_field_paths_and_transition_rules(crd):
    assert crd.validate({"port": 7}, "spec")[1] == ["spec.port: port 7 is refused"]
    assert crd.validate({"port": 8}, "spec")[1] == ["spec: port 8 is taken"]
    # number typed as a CEL double even when written as an integer
    assert crd.validate({"port": 1, "ratio": 0.5}, "spec")[1] == ["spec.ratio: not one half"]
    # the oldSelf rule would fail (no oldSelf here) if it were not skipped
    assert [r.message for r in crd.rules()] == ["port 7 is refused", "failed rule: self.port != 8", "not one half"]


def test_cel_skips_evaluation_errors_on_fields_the_schema_refused(crd):
    # 'port' missing: the schema says so; the rules, which read self.port, add nothing
    assert crd.validate({}, "spec")[1] == ["spec.port: is required"]


def test_field_path():
    assert field_path(("spec", "interfaces", 0, "names")) == "spec.interfaces[0].names"
    assert field_path(("spec", "nodeSelector", "xdpml.io/pool")) == "spec.nodeSelector[xdpml.io/pool]"
