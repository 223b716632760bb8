"""load_manifest: what a valid edgefn.toml gives, and how an invalid one is reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgefn.errors import ManifestError
from edgefn.functions.manifest import MANIFEST, load_manifest
from tests.conftest import DIGITS_FN, GUESTS

VALID = """\
[function]
name = "probe"
version = "0.3.0"

[trigger]
topics = ["sensors/+/probe"]

[publish]
topics = ["results/+/probe"]
"""


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(text)
    return folder


def manifest_error(folder: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / MANIFEST}: "), message
    return message


def test_load_digits_example():
    m = load_manifest(DIGITS_FN)
    assert (m.name, m.version, m.function.module) == ("digits", "1.0.0", "app")
    assert m.trigger.topics == ["sensors/+/digits"]
    assert m.publish.topics == ["results/+/digits"]
    assert m.models.use == ["digits"]
    assert (m.limits.memory_mb, m.limits.timeout_ms, m.limits.instances) == (64, 500, 2)
    assert m.offload is None  # on-overload where a cloud endpoint is configured, else never


def test_load_hostile_guest():
    m = load_manifest(GUESTS / "hostile")
    assert (m.limits.timeout_ms, m.limits.memory_mb, m.limits.max_messages) == (300, 48, 4)


def test_load_minimal_defaults(tmp_path: Path):
    m = load_manifest(write(tmp_path / "probe", '[function]\nname = "p"\nversion = "1"\n[trigger]\ntopics = ["a/#"]\n'))
    assert m.function.module == "app"
    assert m.publish.topics == [] and m.models.use == []
    assert (m.limits.memory_mb, m.limits.timeout_ms, m.limits.instance_bounds, m.limits.max_messages,
            m.limits.max_output_bytes, m.limits.recycle_after) == (64, 500, (1, 2), 16, 65_536, 5_000)
    assert m.latency_budget_ms == 100.0


@pytest.mark.parametrize(("limits", "bounds"), [
    ("instances = 3", (3, 3)),  # the older key: a fixed pool
    ("min_instances = 0\nmax_instances = 4", (0, 4)),
    ("min_instances = 0", (0, 2)),
    ("min_instances = 5", (5, 5)),
    ("max_instances = 4", (1, 4)),
])
def test_limits_instance_bounds(tmp_path: Path, limits: str, bounds: tuple[int, int]):
    m = load_manifest(write(tmp_path, VALID + f"\n[limits]\n{limits}\nidle_s = 0.5\n"))
    assert m.limits.instance_bounds == bounds
    assert m.limits.idle_s == 0.5


@pytest.mark.parametrize(("limits", "expected"), [
    ("instances = 2\nmax_instances = 4", "instances sets both bounds"),
    ("min_instances = 3\nmax_instances = 2", "min_instances (3) is above max_instances (2)"),
    ("max_instances = 0", "limits.max_instances:"),
    ("idle_s = 0", "limits.idle_s:"),
])
def test_error_instance_bounds(tmp_path: Path, limits: str, expected: str):
    assert expected in manifest_error(write(tmp_path, VALID + f"\n[limits]\n{limits}\n"))


@pytest.mark.parametrize("topic", ["#", "+", "a/+/b/#", "+/+", "sensors/dev-1/x y"])
def test_load_valid_topic_filters(tmp_path: Path, topic: str):
    m = load_manifest(write(tmp_path, VALID.replace('"sensors/+/probe"', f'"{topic}"')))
    assert m.trigger.topics == [topic]


def test_error_missing_file(tmp_path: Path):
    message = manifest_error(tmp_path)
    assert "no manifest" in message and MANIFEST in message


def test_error_missing_folder(tmp_path: Path):
    assert "no manifest" in manifest_error(tmp_path / "nowhere")


def test_error_invalid_toml(tmp_path: Path):
    message = manifest_error(write(tmp_path, VALID + "\n[limits\nmemory_mb = 64\n"))
    assert "invalid TOML" in message
    assert "line 11" in message


def test_error_invalid_toml_duplicate_key(tmp_path: Path):
    assert "invalid TOML" in manifest_error(write(tmp_path, VALID.replace('version = "0.3.0"', 'name = "x"')))


def test_error_not_utf8_and_not_a_file(tmp_path: Path):
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / MANIFEST).write_bytes(VALID.replace("0.3.0", "0.3.0 caf\xe9").encode("latin-1"))
    assert manifest_error(tmp_path / "latin1").endswith("not UTF-8 text")
    (tmp_path / "folder" / MANIFEST).mkdir(parents=True)
    assert "cannot read it" in manifest_error(tmp_path / "folder")


@pytest.mark.parametrize(("extra", "field"), [
    ("[limits]\nmemroy_mb = 64\n", "limits.memroy_mb"),
    ("[function2]\nname = 'x'\n", "function2"),
    ("[models]\nuse = []\nallow = ['x']\n", "models.allow"),
])
def test_error_unknown_field(tmp_path: Path, extra: str, field: str):
    message = manifest_error(write(tmp_path, VALID + extra))
    assert f"{field}: Extra inputs are not permitted" in message


def test_error_unknown_function_field(tmp_path: Path):
    message = manifest_error(write(tmp_path, VALID.replace('version = "0.3.0"', 'version = "0.3.0"\nentry = "x"')))
    assert "function.entry: Extra inputs are not permitted" in message


@pytest.mark.parametrize("name", ["Probe", "1probe", "-probe", "pro be", "pröbe", "", "p" * 64, "a/b", "../x"])
def test_error_bad_name(tmp_path: Path, name: str):
    message = manifest_error(write(tmp_path, VALID.replace('name = "probe"', f'name = "{name}"')))
    assert "function.name:" in message
    assert "lowercase letter" in message


def test_error_missing_name(tmp_path: Path):
    assert "function.name: Field required" in manifest_error(write(tmp_path, VALID.replace('name = "probe"\n', "")))


@pytest.mark.parametrize("topic", ["a/#/b", "a+/b", "a/b#", "#/a", "", "a/+x"])
def test_error_bad_topic_filter(tmp_path: Path, topic: str):
    message = manifest_error(write(tmp_path, VALID.replace('"sensors/+/probe"', f'"{topic}"')))
    assert "trigger.topics:" in message
    assert f"{topic!r} is not a valid MQTT topic filter" in message


def test_a_shared_trigger_loads_and_takes_its_priority(tmp_path: Path):
    text = VALID.replace('"sensors/+/probe"', '"$share/g1/sensors/+/probe"') + '\n[trigger.priorities]\n"$share/g1/sensors/+/probe" = "high"\n'
    m = load_manifest(write(tmp_path, text))
    assert m.trigger.topics == ["$share/g1/sensors/+/probe"]
    assert m.trigger.priority_of("sensors/dev1/probe") == "high", "matched by its filter, not as written"


@pytest.mark.parametrize(("topic", "why"), [
    ("$share", "no group name"),
    ("$share/g1", "no filter after its group"),
    ("$share/g1/", "no filter after its group"),
    ("$share//sensors/+/probe", "no group name"),
    ("$share/g+/sensors/+/probe", "group name 'g+' has a wildcard"),
    ("$share/#/sensors", "group name '#' has a wildcard"),
    ("$share/g1/sensors/#/probe", "filter 'sensors/#/probe' has a wildcard that is not a whole level"),
    ("$share/g1/$share/g2/sensors", "shared subscription of a shared subscription"),
])
def test_error_bad_shared_trigger(tmp_path: Path, topic: str, why: str):
    message = manifest_error(write(tmp_path, VALID.replace('"sensors/+/probe"', f'"{topic}"')))
    assert "trigger.topics:" in message and f"{topic!r} is not a valid MQTT topic filter" in message
    assert why in message, message


def test_error_shared_publish_filter(tmp_path: Path):
    message = manifest_error(write(tmp_path, VALID.replace('"results/+/probe"', '"$share/g1/results/+/probe"')))
    assert "publish.topics:" in message and "is a shared subscription" in message


def test_error_reserved_name(tmp_path: Path):
    message = manifest_error(write(tmp_path, VALID.replace('name = "probe"', 'name = "unrouted"')))
    assert "function.name:" in message and "'unrouted' is reserved" in message


def test_error_bad_publish_filter(tmp_path: Path):
    message = manifest_error(write(tmp_path, VALID.replace('"results/+/probe"', '"results/#/probe"')))
    assert "publish.topics:" in message and "'results/#/probe'" in message


def test_error_no_trigger_topics(tmp_path: Path):
    message = manifest_error(write(tmp_path, VALID.replace('topics = ["sensors/+/probe"]', "topics = []")))
    assert re.search(r": trigger: .*at least one trigger topic is needed", message)


def test_error_no_trigger_section(tmp_path: Path):
    message = manifest_error(write(tmp_path, VALID.replace('[trigger]\ntopics = ["sensors/+/probe"]\n', "")))
    assert "trigger: Field required" in message


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("memory_mb", 4, "greater than or equal to 8"),
    ("memory_mb", 5000, "less than or equal to 4096"),
    ("timeout_ms", 0, "greater than or equal to 1"),
    ("timeout_ms", 600_001, "less than or equal to 600000"),
    ("instances", 0, "greater than or equal to 1"),
    ("instances", 65, "less than or equal to 64"),
    ("max_messages", -1, "greater than or equal to 0"),
    ("max_output_bytes", -1, "greater than or equal to 0"),
    ("recycle_after", 0, "greater than or equal to 1"),
    ("memory_mb", '"lots"', "valid integer"),
])
def test_error_limits_out_of_range(tmp_path: Path, field: str, value: object, expected: str):
    message = manifest_error(write(tmp_path, VALID + f"\n[limits]\n{field} = {value}\n"))
    assert f"limits.{field}:" in message
    assert expected in message


def test_error_several_problems_all_named(tmp_path: Path):
    text = VALID.replace('name = "probe"', 'name = "Bad"') + "\n[limits]\ninstances = 0\n"
    message = manifest_error(write(tmp_path, text))
    assert "function.name:" in message and "limits.instances:" in message


def test_error_bad_offload(tmp_path: Path):
    message = manifest_error(write(tmp_path, 'offload = "sometimes"\n' + VALID))
    assert "offload:" in message and "'on-overload'" in message
