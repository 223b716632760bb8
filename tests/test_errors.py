"""edgefn's exceptions (edgefn/errors.py): the tree its docstring draws is the tree in the code, the
errors that stand for an HTTP answer carry its status one way, and validation errors read as one line."""

from __future__ import annotations

import ast
import importlib
import re

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from edgefn import errors
from edgefn.errors import CloudError, CloudUnavailable, EdgefnError, FleetError, HttpStatus, PublishRefused
from edgefn.protocol.oip import OipError, ProtocolError
from tests.test_imports import MODULES


def drawn_tree() -> dict[str, str | None]:
    """class name -> its parent's name, as the module docstring draws them."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^ {4}((?:[│ ] {3})*)(?:[├└]── )?([A-Z]\w+)(?:\s|$)", line)
        if not match or not (match.group(2) == "EdgefnError" or "── " in line):
            continue
        depth = len(match.group(1)) // 4 + (1 if "── " in line else 0)
        del path[depth:]
        parents[match.group(2)] = path[-1] if path else None
        path.append(match.group(2))
    return parents


def modules_defining_errors() -> list[str]:
    """The modules of edgefn and cloud_sync with a class based on an EdgefnError (read, not imported)."""
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in MODULES.items()}
    names, found = {"EdgefnError"}, {"edgefn.errors"}
    grew = True
    while grew:  # a class based on one found in another module
        grew = False
        for module, tree in trees.items():
            for node in ast.walk(tree):
                bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None)
                         for b in getattr(node, "bases", [])}
                if isinstance(node, ast.ClassDef) and bases & names and node.name not in names:
                    names.add(node.name)
                    found.add(module)
                    grew = True
    return sorted(found)


def code_tree() -> dict[str, str | None]:
    for module in modules_defining_errors():
        importlib.import_module(module)
    parents: dict[str, str | None] = {"EdgefnError": None}
    todo = [EdgefnError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            assert sub.__name__ not in parents, f"two error classes named {sub.__name__}"
            parents[sub.__name__] = cls.__name__
            todo.append(sub)
    return parents


def test_every_error_is_defined_in_errors_py():
    assert modules_defining_errors() == ["edgefn.errors"]


def test_the_docstring_draws_the_tree_of_the_code():
    drawn, code = drawn_tree(), code_tree()
    assert "FleetError" in drawn and drawn["PayloadTooLarge"] == "FunctionError"  # the drawing is read
    missing = sorted(set(code) - set(drawn))
    assert not missing, f"not in errors.py's docstring: {missing}"
    assert drawn == code


@pytest.mark.parametrize(("error", "status"), [
    (CloudError("refused", 404), 404),
    (CloudUnavailable("no answer"), None),
    (FleetError("no rollout 7", status=404), 404),
    (FleetError("cannot reach the fleet server"), None),
    (PublishRefused("not TUF metadata"), 400),
    (OipError("the body is larger than 1 bytes", status=413), 413),
    (OipError("internal error"), 500),
    (ProtocolError("'inputs' must be a JSON array"), 400),
])
def test_errors_of_http_answers_carry_their_status(error: HttpStatus, status: int | None):
    assert isinstance(error, HttpStatus) and error.status == status
    assert str(error) == error.args[0] and "status" not in str(error)


def test_a_protocol_error_is_still_a_value_error():
    assert issubclass(ProtocolError, ValueError) and issubclass(ProtocolError, OipError)
    assert not issubclass(OipError, EdgefnError)


class _Sample(BaseModel):
    name: str
    count: int

    @field_validator("name")
    @classmethod
    def _short(cls, value: str) -> str:
        if len(value) > 3:
            raise ValueError("at most 3 letters")
        return value


def _invalid(**data: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Sample.model_validate(data)
    return caught.value


def test_validation_text_is_one_line_with_the_path_of_each_problem():
    text = errors.validation_text(_invalid(name="long", count="x"))
    assert text == ("name: Value error, at most 3 letters; "
                    "count: Input should be a valid integer, unable to parse string as an integer")


def test_validation_text_messages_replace_pydantic_s_by_type():
    assert errors.validation_text(_invalid(name="long", count=1), {"value_error": "{error}"}) == "name: at most 3 letters"
    assert errors.validation_text(_invalid(name="a"), {"missing": "needed"}) == "count: needed"


def test_validation_text_names_the_top_level():
    with pytest.raises(ValidationError) as caught:
        _Sample.model_validate([1])
    assert errors.validation_text(caught.value).startswith("(top level): ")
