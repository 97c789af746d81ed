"""Input/output validation: derived models, the coercion rule, every refusal, redaction."""

# No `from __future__ import annotations`: several tools below are defined inside tests and
# their annotations must be real objects (build_models resolves strings at module level only).

import datetime
import enum
import json
import math
import typing
from collections import abc
from typing import Annotated, Any, Literal, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from failcore._errors import InputValidationError, OutputValidationError, RegistrationError
from failcore._validation import REDACTED, Secret, ToolModels, build_models, tighten


def http_get(url: str, timeout: int = 10) -> str:
    """Fetch a URL and return its body.

    The second paragraph is not part of the description.
    """
    return url


class Retry(BaseModel):
    attempts: int
    backoff: float = 0.5


class Config(BaseModel):
    retries: int
    retry: Retry | None = None
    tags: list[str] = []


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


def deploy(cfg: Config, token: Annotated[str, Secret], region: Literal["eu", "us"] = "eu") -> Config:
    return cfg


@pytest.fixture(scope="module")
def get() -> ToolModels:
    return build_models("http_get", http_get)


@pytest.fixture(scope="module")
def dep() -> ToolModels:
    return build_models("deploy", deploy)


def refused(models: ToolModels, kwargs: dict[str, Any]) -> InputValidationError:
    with pytest.raises(InputValidationError) as info:
        models.validate_input(kwargs)
    return info.value


# -- derivation ---------------------------------------------------------------------------------


def test_derived_model_fills_defaults_and_names(get: ToolModels) -> None:
    assert get.name == "http_get"
    assert get.description == "Fetch a URL and return its body."
    assert list(get.input_model.model_fields) == ["url", "timeout"]
    assert get.validate_input({"url": "https://a.example"}) == {"url": "https://a.example", "timeout": 10}
    assert get.validate_input({"url": "u", "timeout": 3}) == {"url": "u", "timeout": 3}
    assert get.secret_fields == frozenset()


def test_description_explicit_and_missing() -> None:
    def nodoc(x: int) -> int:
        return x

    assert build_models("n", nodoc).description == ""
    assert build_models("n", http_get, description="Custom.").description == "Custom."


def test_unannotated_parameters_accept_anything() -> None:
    def loose(a, b=3):  # type: ignore[no-untyped-def]
        return a

    models = build_models("loose", loose)
    assert models.validate_input({"a": object, "b": "x"}) == {"a": object, "b": "x"}
    assert models.validate_input({"a": [1]}) == {"a": [1], "b": 3}
    assert models.output_model is None
    sentinel = object()
    assert models.validate_output(sentinel) is sentinel


def test_optional_list_dict_literal_enum_date_and_nested() -> None:
    def rich(
        name: Optional[str],  # noqa: UP045 - the typing spelling must work too
        ids: list[int],
        weights: dict[str, float],
        mode: Literal["r", "w"] = "r",
        color: Color = Color.RED,
        day: datetime.date | None = None,
        pair: tuple[int, int] = (0, 0),
        cfg: Config | None = None,
    ) -> None:
        return None

    models = build_models("rich", rich)
    got = models.validate_input({
        "name": None, "ids": [1, 2], "weights": {"a": 1, "b": 0.5}, "mode": "w", "color": "blue",
        "day": "2024-02-29", "pair": [1, 2], "cfg": {"retries": 2, "retry": {"attempts": 3}},
    })
    assert got["name"] is None and got["ids"] == [1, 2] and got["mode"] == "w"
    assert got["weights"] == {"a": 1.0, "b": 0.5}
    assert got["color"] is Color.BLUE
    assert got["day"] == datetime.date(2024, 2, 29)
    assert got["pair"] == (1, 2)
    assert isinstance(got["cfg"], Config) and got["cfg"].retry == Retry(attempts=3)
    assert models.validate_output(None) is None
    with pytest.raises(OutputValidationError):
        models.validate_output("something")


def test_mutable_defaults_are_not_shared() -> None:
    def f(items: list[int] = []) -> None:  # noqa: B006 - the point of the test
        return None

    models = build_models("f", f)
    first = models.validate_input({})
    first["items"].append(1)
    assert models.validate_input({}) == {"items": []}


def test_parameter_names_pydantic_reserves_still_work() -> None:
    def odd(json: str, model_config: int = 1, _private: bool = False, schema: str = "s") -> None:
        return None

    models = build_models("odd", odd)
    got = models.validate_input({"json": "j", "model_config": 2, "_private": True})
    assert got == {"json": "j", "model_config": 2, "_private": True, "schema": "s"}
    err = refused(models, {"json": "j", "_private": 1})
    assert "argument '_private': Input should be a valid boolean" in str(err)
    assert set(models.input_model.model_json_schema()["properties"]) == {
        "json", "model_config", "_private", "schema"}


@pytest.mark.parametrize("source", [
    "def f(*args: int) -> None: ...",
    "def f(a: int, /, b: int) -> None: ...",
])
def test_positional_parameters_are_refused(source: str) -> None:
    ns: dict[str, Any] = {}
    exec(source, ns)
    with pytest.raises(RegistrationError, match="keyword arguments only"):
        build_models("f", ns["f"])


def test_var_keyword_needs_an_input_model() -> None:
    def anything(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    with pytest.raises(RegistrationError, match=r"\*\*kwargs.*input_model="):
        build_models("anything", anything)

    class In(BaseModel):
        q: str
        limit: int = 5

    models = build_models("anything", anything, input_model=In)
    assert models.validate_input({"q": "x"}) == {"q": "x", "limit": 5}
    assert "unexpected argument 'z'" in str(refused(models, {"q": "x", "z": 1}))


def test_explicit_input_model_must_match_the_function() -> None:
    class In(BaseModel):
        url: str
        verbose: bool = False

    with pytest.raises(RegistrationError, match=r"does not accept: \['verbose'\]"):
        build_models("http_get", http_get, input_model=In)
    with pytest.raises(RegistrationError, match="BaseModel subclass"):
        build_models("http_get", http_get, input_model=dict)  # type: ignore[arg-type]


def test_explicit_input_model_forbids_unknown_unless_it_allows_extra() -> None:
    def f(**kwargs: Any) -> None:
        return None

    class Ignoring(BaseModel):  # pydantic's default is extra="ignore": we still refuse
        a: int

    class Allowing(BaseModel):
        model_config = ConfigDict(extra="allow")
        a: int

    assert "unexpected argument 'b'" in str(refused(build_models("f", f, input_model=Ignoring),
                                                    {"a": 1, "b": 2}))
    allowing = build_models("f", f, input_model=Allowing)
    assert allowing.validate_input({"a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_explicit_models_keep_their_own_config_and_secrets() -> None:
    def login(user: str, password: str) -> None:
        return None

    class In(BaseModel):
        user: str
        password: Annotated[str, Secret()]

    models = build_models("login", login, input_model=In)
    assert models.secret_fields == frozenset({"password"})
    assert models.redact({"user": "u", "password": "hunter22"}) == {"user": "u", "password": REDACTED}


def test_registration_refusals() -> None:
    with pytest.raises(RegistrationError, match="must be callable"):
        build_models("x", 42)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match=r"secret=\['pasword'\] names no argument"):
        build_models("http_get", http_get, secret=["pasword"])

    def unresolved(x: "NoSuchType") -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(RegistrationError, match="cannot read the signature"):
        build_models("u", unresolved)

    class Opaque:
        pass

    def opaque(x: Opaque) -> None:
        return None

    with pytest.raises(RegistrationError, match="cannot build an input model"):
        build_models("o", opaque)

    def returns_opaque() -> Opaque:
        return Opaque()

    with pytest.raises(RegistrationError, match="return annotation"):
        build_models("o", returns_opaque)
    with pytest.raises(RegistrationError, match="output_model must be"):
        build_models("h", http_get, output_model=int)  # type: ignore[arg-type]


# -- the coercion rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(("annotation", "value"), [
    (int, "5"), (int, 5.0), (int, True), (float, "1.5"), (bool, 1), (bool, "true"),
    (str, 5), (list[int], ["1"]), (dict[str, int], {"a": "1"}), (Optional[int], "5"),  # noqa: UP045
])
def test_number_string_and_bool_coercions_are_refused(annotation: Any, value: Any) -> None:
    def f(x):  # type: ignore[no-untyped-def]
        return x

    f.__annotations__ = {"x": annotation}
    err = refused(build_models("f", f), {"x": value})
    assert err.errors[0]["loc"] in ("x", "x[0]", "x.a")


def test_string_five_for_an_int_is_refused_with_a_clear_message(get: ToolModels) -> None:
    err = refused(get, {"url": "u", "timeout": "5"})
    assert str(err) == "http_get: argument 'timeout': Input should be a valid integer (got str '5')"


def test_lossless_widening_is_accepted() -> None:
    def f(x: float, y: float | None = None) -> float:
        return x

    models = build_models("f", f)
    assert models.validate_input({"x": 5, "y": 2}) == {"x": 5.0, "y": 2.0}
    assert models.validate_output(3) == 3.0


def test_tighten_is_pure_and_keeps_metadata() -> None:
    assert tighten(str) is str
    assert tighten(Config) is Config
    assert tighten(int) == Annotated[int, Strict()]
    assert tighten(list[int]) == list[Annotated[int, Strict()]]
    assert tighten(tuple[int, ...]) == tuple[Annotated[int, Strict()], ...]
    assert tighten(Annotated[str, Secret]) is str
    field = Field(ge=0)
    assert tighten(Annotated[int, Secret(), field]) == Annotated[int, Strict(), field]
    assert tighten(Literal[1, 2]) == Literal[1, 2]
    assert tighten(typing.List[int]) == typing.List[Annotated[int, Strict()]]  # noqa: UP006
    assert tighten(abc.Mapping[str, bool]) == abc.Mapping[str, Annotated[bool, Strict()]]
    assert tighten(int | None) == Optional[Annotated[int, Strict()]]  # noqa: UP045


# -- input refusals -------------------------------------------------------------------------------


def test_wrong_type_message_and_errors(get: ToolModels) -> None:
    err = refused(get, {"url": 5})
    assert str(err) == "http_get: argument 'url': Input should be a valid string (got int 5)"
    assert err.errors == [{"loc": "url", "msg": "Input should be a valid string", "type": "string_type"}]


def test_unknown_argument_names_what_is_accepted(get: ToolModels) -> None:
    err = refused(get, {"url": "u", "foo": 1})
    assert str(err) == "http_get: unexpected argument 'foo'; http_get accepts: url, timeout"
    assert err.errors[0]["loc"] == "foo"
    err = refused(get, {"url": "u", "foo": 1, "bar": 2})
    assert "unexpected arguments 'foo', 'bar'" in str(err)


def test_missing_argument_says_what_was_expected(get: ToolModels) -> None:
    err = refused(get, {})
    assert str(err) == "http_get: missing required argument 'url' (expected str)"
    assert err.errors == [{"loc": "url", "msg": "Field required", "type": "missing"}]


def test_every_bad_field_is_named(dep: ToolModels) -> None:
    err = refused(dep, {"cfg": {"retries": "x", "tags": ["a", 2]}, "token": "t", "region": "mars",
                        "extra": 1})
    text = str(err)
    assert text.startswith("deploy: unexpected argument 'extra'; deploy accepts: cfg, token, region")
    assert "argument 'cfg.retries': Input should be a valid integer" in text
    assert "argument 'cfg.tags[1]': Input should be a valid string (got int 2)" in text
    assert "argument 'region': Input should be 'eu' or 'us' (got str 'mars')" in text
    assert {e["loc"] for e in err.errors} == {"cfg.retries", "cfg.tags[1]", "region", "extra"}


def test_nested_wrong_type_and_nested_missing(dep: ToolModels) -> None:
    err = refused(dep, {"cfg": {"retries": 1, "retry": {"attempts": "many"}}, "token": "t"})
    assert err.errors[0]["loc"] == "cfg.retry.attempts"
    err = refused(dep, {"cfg": {}, "token": "t"})
    assert "argument 'cfg.retries': Field required" in str(err)
    err = refused(dep, {"cfg": "not a dict", "token": "t"})
    assert "argument 'cfg': Input should be a valid dictionary or instance of Config" in str(err)


def test_secret_values_are_never_echoed() -> None:
    def login(user: str, password: Annotated[str, Secret, Field(min_length=12)],
              api_key: Optional[Annotated[str, Secret()]] = None,  # noqa: UP045
              pin: int = 0) -> None:
        return None

    models = build_models("login", login, secret=["pin"])
    assert models.secret_fields == frozenset({"password", "api_key", "pin"})
    err = refused(models, {"user": "u", "password": "hunter2-abc", "api_key": 12345678901,
                           "pin": "9876"})
    text = str(err) + json.dumps(err.errors)
    for leaked in ("hunter2-abc", "12345678901", "9876"):
        assert leaked not in text
    assert "argument 'password': String should have at least 12 characters (got str)" in text
    assert "argument 'pin'" in text and "(got str)" in text
    # pydantic's own error shows input values: it must not ride along as cause or context.
    assert err.__cause__ is None and err.__context__ is None


def test_secret_echoed_by_a_validator_message_is_hidden() -> None:
    class Creds(BaseModel):
        token: Annotated[str, Secret]

        @field_validator("token")
        @classmethod
        def shape(cls, v: str) -> str:
            raise ValueError(f"token {v} is malformed")

    def use(token: str) -> None:
        return None

    err = refused(build_models("use", use, input_model=Creds), {"token": "s3cr3t-value"})
    assert "s3cr3t-value" not in str(err) + json.dumps(err.errors)
    assert "argument 'token': invalid value (value_error)" in str(err)


def test_non_mapping_input_is_refused(get: ToolModels) -> None:
    err = refused(get, None)  # type: ignore[arg-type]
    assert str(err).startswith("http_get: arguments: Input should be a valid dictionary")


# -- output ---------------------------------------------------------------------------------------


def test_output_refusal_names_tool_expected_and_actual(get: ToolModels) -> None:
    assert get.validate_output("body") == "body"
    with pytest.raises(OutputValidationError) as info:
        get.validate_output(["secret body"])
    text = str(info.value)
    assert text.startswith("http_get returned list, expected str: Input should be a valid string")
    assert "secret body" not in text
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert info.value.errors == [{"loc": "", "msg": "Input should be a valid string", "type": "string_type"}]


def test_output_model_shapes(dep: ToolModels) -> None:
    assert dep.output_model is not None and list(dep.output_model.model_fields) == ["result"]
    assert dep.validate_output({"retries": 1}) == Config(retries=1)
    with pytest.raises(OutputValidationError, match=r"deploy returned dict, expected Config: retries: Field required"):
        dep.validate_output({})

    class Out(BaseModel):
        ok: bool

    explicit = build_models("h", http_get, output_model=Out)
    assert explicit.output_model is Out
    assert explicit.validate_output({"ok": True}) == Out(ok=True)
    with pytest.raises(OutputValidationError, match="h returned str, expected Out"):
        explicit.validate_output("body")

    def nothing() -> None:
        return None

    with pytest.raises(OutputValidationError, match="expected None"):
        build_models("nothing", nothing).validate_output(0)


def test_output_json_round_trip() -> None:
    def f() -> tuple[datetime.date, bytes, Config, list[int]]:
        raise NotImplementedError

    models = build_models("f", f)
    value = models.validate_output((datetime.date(2024, 1, 2), b"\xff\x00", {"retries": 1}, [1]))
    data = models.output_to_json(value)
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data[0] == "2024-01-02"
    assert models.output_from_json(data) == value


def test_output_json_without_a_model_never_raises() -> None:
    def f():  # type: ignore[no-untyped-def]
        return None

    models = build_models("f", f)
    thing = object()
    # One encoding for the whole trace: memory addresses dropped (equal runs, equal traces).
    assert models.output_to_json({"a": (1, 2), "o": thing}) == {"a": [1, 2], "o": "<object object>"}
    assert models.output_from_json({"a": [1, 2]}) == {"a": [1, 2]}
    assert models.output_from_json(models.output_to_json({"b": b"\xff"})) == {"b": b"\xff"}


# -- redaction ------------------------------------------------------------------------------------


def test_redact_replaces_secrets_and_makes_values_json_able(dep: ToolModels) -> None:
    thing = object()
    kwargs = {"cfg": Config(retries=1), "token": "abc", "region": "eu", "nan": math.nan,
              "raw": b"\xff", "obj": thing, "when": datetime.date(2024, 1, 2)}
    red = dep.redact(kwargs)
    assert red == {"cfg": {"retries": 1, "retry": None, "tags": []}, "token": REDACTED,
                   "region": "eu", "nan": "NaN", "raw": {"$bytes": "/w=="}, "obj": "<object object>",
                   "when": "2024-01-02"}
    json.dumps(red, allow_nan=False, sort_keys=True)
    assert kwargs["token"] == "abc"  # the caller's dict is not modified


# -- properties -----------------------------------------------------------------------------------


def simple(name: str, count: int, ratio: float = 0.5, flag: bool = False,
           tags: list[str] | None = None, mode: Literal["a", "b"] = "a") -> None:
    return None


SIMPLE = build_models("simple", simple)
_DEFAULTS = {"ratio": 0.5, "flag": False, "tags": None, "mode": "a"}
_valid = st.fixed_dictionaries(
    {"name": st.text(), "count": st.integers()},
    optional={
        "ratio": st.floats(allow_nan=False, allow_infinity=False),
        "flag": st.booleans(),
        "tags": st.none() | st.lists(st.text(), max_size=5),
        "mode": st.sampled_from(["a", "b"]),
    },
)


@given(_valid)
def test_any_valid_input_passes_and_round_trips(kwargs: dict[str, Any]) -> None:
    validated = SIMPLE.validate_input(kwargs)
    assert validated == {**_DEFAULTS, **kwargs}
    assert SIMPLE.redact(kwargs) == kwargs
    assert json.loads(json.dumps(SIMPLE.redact(validated))) == validated


@given(st.integers().map(str) | st.floats() | st.booleans())
def test_a_count_that_is_not_an_int_is_always_refused(value: Any) -> None:
    with pytest.raises(InputValidationError, match="argument 'count'"):
        SIMPLE.validate_input({"name": "n", "count": value})
