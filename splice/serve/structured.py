"""Structured output in the HTTP API: OpenAI's ``response_format`` and vLLM's ``guided_*`` extensions.

A request may ask for one of:

- ``response_format={"type": "json_object"}``: any JSON object;
- ``response_format={"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` (OpenAI's shape):
  JSON matching ``schema`` (always enforced; ``strict`` is accepted and changes nothing);
- ``guided_json`` (a schema, or its JSON text), ``guided_regex`` (a full match), ``guided_choice`` (one of a
  list of strings): vLLM's request extensions, so clients written for vLLM work unchanged (the ``openai``
  client sends them through ``extra_body``).

``response_format={"type": "text"}`` (or none) is unconstrained. :func:`constraint_for` turns the fields into
a :class:`~splice.engine.constraints.Constraint` compiled for the served tokenizer (compiles are cached by
the engine's :class:`~splice.engine.constraints.Grammars`), or raises :class:`StructuredOutputError`, a
ValueError naming the parameter: an invalid schema, a bad regex, an empty choice list, two constraints at
once. A request that hits ``max_tokens`` before the grammar completes ends with ``finish_reason`` "length":
its text is then a prefix of a valid output.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from splice.engine.constraints import Constraint, Grammars, choice, json_object, json_schema, regex

__all__ = ["StructuredFields", "StructuredOutputError", "constraint_for"]


class StructuredOutputError(ValueError):
    """A structured-output parameter the server refuses; ``param`` names it (OpenAI's error body)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class StructuredFields(BaseModel):
    """The request fields that constrain the output (mixed into the completion and chat bodies)."""

    model_config = ConfigDict(extra="ignore")
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None


def _response_format(value: dict[str, Any]) -> Constraint | None:
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_object()
    if kind != "json_schema":
        raise StructuredOutputError(f"response_format.type {kind!r} is not supported: use 'text', 'json_object' "
                                    "or 'json_schema'", param="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise StructuredOutputError("response_format.json_schema.schema is missing: give "
                                    '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                                    param="response_format")
    return json_schema(spec["schema"])


def _requested(fields: StructuredFields) -> list[tuple[str, Any]]:
    """(param, value) of every constraint the request sets (``response_format`` "text" sets none)."""
    given = [("response_format", fields.response_format), ("guided_json", fields.guided_json),
             ("guided_regex", fields.guided_regex), ("guided_choice", fields.guided_choice)]
    text = fields.response_format is not None and fields.response_format.get("type", "text") == "text"
    return [(param, value) for param, value in given if value is not None and not (param == "response_format"
                                                                                   and text)]


def _constraint(param: str, value: Any) -> Constraint | None:
    if param == "response_format":
        return _response_format(value)
    if param == "guided_json":
        return json_schema(value)
    if param == "guided_regex":
        return regex(value)
    return choice(value)


def constraint_for(fields: StructuredFields, grammars: Grammars) -> Constraint | None:
    """The request's constraint compiled for ``grammars``' tokenizer (None: unconstrained); see module
    docstring. Runs llguidance: call it off the event loop."""
    requested = _requested(fields)
    if len(requested) > 1:
        names = " and ".join(param for param, _ in requested)
        raise StructuredOutputError(f"give one of response_format, guided_json, guided_regex and guided_choice; "
                                    f"this request sets {names}", param=requested[1][0])
    if not requested:
        return None
    param, value = requested[0]
    try:
        constraint = _constraint(param, value)
        if constraint is not None:
            grammars.compile(constraint)
    except StructuredOutputError:
        raise
    except (ValueError, ImportError) as error:
        raise StructuredOutputError(f"{param}: {error}", param=param) from None
    return constraint
