"""The `edgefn` command line, through typer's CliRunner on the real app (real components, real models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from cloud_sync.serve import start_server
from edgefn.cli.main import app
from edgefn.functions.manifest import load_manifest
from tests.conftest import DIGITS_FN, MODELS

# Wide, so that rich does not wrap long paths and messages in the middle of what is checked.
runner = CliRunner(env={"COLUMNS": "400"})

COMMANDS = [[], ["run"], ["demo"], ["version"], ["status"], ["fn"], ["fn", "new"], ["fn", "build"], ["fn", "invoke"],
            ["cloud", "check"]]


def lines_on(output: str, topic: str) -> list[dict]:
    """The JSON bodies of the `<topic> <json>` lines that `fn invoke` printed."""
    found = []
    for line in output.splitlines():
        name, _, body = line.partition(" ")
        if name == topic:
            found.append(json.loads(body))
    return found


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture()
def state_dir(tmp_path: Path, component_cache: Path) -> Path:
    """A private state dir whose compiled-component cache is the session's: nothing is recompiled."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "components").symlink_to(component_cache, target_is_directory=True)
    return state


@pytest.fixture(scope="module")
def digit() -> tuple[list[int], int]:
    x, y = load_digits(return_X_y=True)
    return [int(v) for v in x[1500]], int(y[1500])


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "edgefn")
def test_help_every_command(command: list[str]):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "--help" in result.output


def test_help_lists_commands():
    top = runner.invoke(app, ["--help"]).output
    assert all(name in top for name in ("run", "fn", "demo", "version"))
    fn = runner.invoke(app, ["fn", "--help"]).output
    assert all(name in fn for name in ("new", "build", "invoke"))


def test_help_describes_options():
    assert "mqtt://HOST:PORT" in runner.invoke(app, ["run", "--help"]).output
    invoke = runner.invoke(app, ["fn", "invoke", "--help"]).output
    assert "--topic" in invoke and "--payload" in invoke and "@FILE" in invoke


def test_run_help_shows_the_defaults_and_the_environment_variables():
    text = flat(runner.invoke(app, ["run", "-h"]).output)
    for default in ("default: ./functions", "default: ./models", "mqtt://127.0.0.1:1883", "~/.local/state/edgefn",
                    "[default: info]"):
        assert default in text, default
    # "[env EDGEFN_USERNAME]" was read as rich markup and printed "Broker user name ."
    for name in ("EDGEFN_BROKER", "EDGEFN_USERNAME", "EDGEFN_CLOUD_URL", "EDGEFN_FLEET_URL"):
        assert name in text, name


@pytest.mark.parametrize("command", [["-h"], ["fn", "-h"], ["fn", "invoke", "-h"], ["model", "bench", "-h"]],
                         ids=" ".join)
def test_dash_h_is_help(command: list[str]):
    result = runner.invoke(app, command)
    assert result.exit_code == 0 and "Usage:" in result.output, result.output


def test_dash_dash_version_prints_the_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("edgefn 0."), result.output


@pytest.mark.parametrize(("flag", "value"), [("--log-level", "verbose"), ("--journal", "ram"), ("--offload", "maybe")])
def test_run_refuses_a_choice_it_does_not_know(tmp_path: Path, flag: str, value: str):
    result = runner.invoke(app, ["run", flag, value, "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and value in result.output and "Traceback" not in result.output, result.output


def test_no_args_shows_help():
    result = runner.invoke(app, [])
    assert "Usage:" in result.output
    assert "fn" in result.output


def test_version_exits_zero():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0, result.output
    for pkg in ("edgefn", "wasmtime", "onnxruntime", "paho-mqtt"):
        assert pkg in result.output
    assert "50.0.1" in result.output


# --- fn new --------------------------------------------------------------------------------------


def test_new_creates_a_loadable_function(tmp_path: Path):
    result = runner.invoke(app, ["fn", "new", "probe", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "probe"
    assert sorted(p.name for p in folder.iterdir()) == ["app.py", "edgefn.toml", "event.json"]
    manifest = load_manifest(folder)
    assert manifest.name == "probe"
    assert manifest.trigger.topics == ["sensors/+/probe"]
    assert manifest.publish.topics == ["results/+/probe"]
    assert json.loads((folder / "event.json").read_text())["id"] == "sample-1"
    compile((folder / "app.py").read_text(), "app.py", "exec")
    assert "created" in result.output and f"next: edgefn fn invoke {folder}" in flat(result.output)


@pytest.mark.parametrize("name", ["Bad Name", "a/b", "../escape", "1st", "UPPER", ""])
def test_new_bad_name_fails_and_leaves_nothing(tmp_path: Path, name: str):
    parent = tmp_path / "fns"
    parent.mkdir()
    result = runner.invoke(app, ["fn", "new", name, "--dir", str(parent)])
    assert result.exit_code == 2
    assert f"{name!r} is not a valid function name" in flat(result.output)
    assert list(tmp_path.rglob("*")) == [parent]


def test_new_twice_fails(tmp_path: Path):
    assert runner.invoke(app, ["fn", "new", "probe", "--dir", str(tmp_path)]).exit_code == 0
    before = (tmp_path / "probe" / "app.py").read_text()
    (tmp_path / "probe" / "app.py").write_text(before + "# edited\n")
    result = runner.invoke(app, ["fn", "new", "probe", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert (tmp_path / "probe" / "app.py").read_text() == before + "# edited\n"  # untouched


# --- fn build + fn invoke --------------------------------------------------------------------


@pytest.mark.slow
def test_build_then_invoke_scaffolded_function(tmp_path: Path):
    state = tmp_path / "state"  # its own cache: this component is new anyway
    assert runner.invoke(app, ["fn", "new", "probe", "--dir", str(tmp_path)]).exit_code == 0
    folder = tmp_path / "probe"
    built = runner.invoke(app, ["fn", "build", str(folder), "--state-dir", str(state)])
    assert built.exit_code == 0, built.output
    assert "built" in built.output and "precompiled" in built.output
    assert (folder / "build" / "probe.wasm").is_file()
    assert len(list((state / "components").glob("*.cwasm"))) == 1

    result = runner.invoke(app, ["fn", "invoke", str(folder), "--topic", "sensors/dev1/probe",
                                 "--payload", f"@{folder / 'event.json'}", "--state-dir", str(state),
                                 "--models", str(MODELS)])
    assert result.exit_code == 0, result.output
    assert lines_on(result.stdout, "results/dev1/probe") == [{"event_id": "invoke-1", "keys": ["id", "value"]}]
    assert len(list((state / "components").glob("*.cwasm"))) == 1  # reused, not compiled again


@pytest.mark.slow
def test_a_function_sharing_its_source_by_a_link_builds_and_runs_its_own_model(tmp_path: Path,
                                                                               digit: tuple[list[int], int]):
    """examples/functions/digits-cnn: app.py links to the digits example's; the model is named like the
    function, so the same code runs digits-cnn and answers on results/<device>/digits-cnn."""
    examples = Path(__file__).parent.parent / "examples" / "functions"
    for name in ("digits", "digits-cnn"):
        shutil.copytree(examples / name, tmp_path / name, symlinks=True, ignore=shutil.ignore_patterns("build"))
    assert (tmp_path / "digits-cnn" / "app.py").is_symlink()
    state = tmp_path / "state"
    built = runner.invoke(app, ["fn", "build", str(tmp_path / "digits-cnn"), "--state-dir", str(state)])
    assert built.exit_code == 0, built.output
    pixels, label = digit
    result = runner.invoke(app, ["fn", "invoke", str(tmp_path / "digits-cnn"), "--topic", "sensors/d9/digits-cnn",
                                 "--payload", json.dumps({"id": "cnn-1", "pixels": pixels}),
                                 "--state-dir", str(state), "--models", str(MODELS)])
    assert result.exit_code == 0, result.output
    [doc] = lines_on(result.stdout, "results/d9/digits-cnn")
    assert (doc["event_id"], doc["label"], doc["function"]) == ("cnn-1", label, "digits-cnn")


def test_invoke_digits_classifies_a_real_digit(tmp_path: Path, digits_fn: Path, state_dir: Path,
                                               digit: tuple[list[int], int]):
    pixels, label = digit
    payload = tmp_path / "digit.json"
    payload.write_text(json.dumps({"id": "cli-1", "pixels": pixels}))
    result = runner.invoke(app, ["fn", "invoke", str(digits_fn), "--topic", "sensors/dev1/digits",
                                 "--payload", f"@{payload}", "--state-dir", str(state_dir),
                                 "--models", str(MODELS)])
    assert result.exit_code == 0, result.output
    [out] = lines_on(result.stdout, "results/dev1/digits")
    assert out["event_id"] == "cli-1"
    assert out["label"] == label
    assert 0.0 < out["score"] <= 1.0
    assert (out["function"], out["version"], out["ran_on"]) == ("digits", "1.0.0", "local")


def test_invoke_inline_payload(digits_fn: Path, state_dir: Path, digit: tuple[list[int], int]):
    result = runner.invoke(app, ["fn", "invoke", str(digits_fn), "--topic", "sensors/dev7/digits",
                                 "--payload", json.dumps({"pixels": digit[0]}), "--state-dir", str(state_dir),
                                 "--models", str(MODELS)])
    assert result.exit_code == 0, result.output
    [out] = lines_on(result.stdout, "results/dev7/digits")
    assert out["event_id"] == "invoke-1"  # no id in the payload: the event's own
    assert out["label"] == digit[1]


def test_invoke_takes_the_topic_from_the_trigger_and_the_payload_from_event_json(
        tmp_path: Path, digits_fn: Path, state_dir: Path, digit: tuple[list[int], int]):
    folder = tmp_path / "digits"
    shutil.copytree(digits_fn, folder)  # mtimes kept: still built
    (folder / "event.json").write_text(json.dumps({"id": "sample-1", "pixels": digit[0]}))
    result = runner.invoke(app, ["fn", "invoke", str(folder), "-m", str(MODELS), "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    [out] = lines_on(result.stdout, "results/dev1/digits")  # sensors/+/digits -> sensors/dev1/digits
    assert (out["event_id"], out["label"]) == ("sample-1", digit[1])
    assert "warning" not in result.output
    # A topic the daemon would not run the function for is said, and run anyway.
    typo = runner.invoke(app, ["fn", "invoke", str(folder), "-m", str(MODELS), "--state-dir", str(state_dir),
                               "--topic", "sensor/dev1/digits"])
    assert "warning: sensor/dev1/digits matches none of digits's triggers (sensors/+/digits)" in flat(typo.output)
    # Without event.json, --payload is asked for by name.
    (folder / "event.json").unlink()
    missing = runner.invoke(app, ["fn", "invoke", str(folder), "-m", str(MODELS), "--state-dir", str(state_dir)])
    assert missing.exit_code == 2 and "no --payload, and no" in flat(missing.output)


def test_invoke_without_models_hints_at_the_flag(tmp_path: Path, digits_fn: Path, state_dir: Path, monkeypatch,
                                                 digit: tuple[list[int], int]):
    monkeypatch.chdir(tmp_path)  # no ./models here: it said "no model named 'digits' (known: none)"
    result = runner.invoke(app, ["fn", "invoke", str(digits_fn), "--payload", json.dumps({"pixels": digit[0]}),
                                 "--state-dir", str(state_dir)])
    assert result.exit_code == 1, result.output
    [err] = lines_on(result.stdout, "edgefn/errors/digits")
    assert "no model named 'digits': no model at all under models (give the folder of models with --models)" \
        in err["error"]


def test_invoke_keeps_its_own_state_and_starts_fresh_on_request(tmp_path: Path, hostile_fn: Path, state_dir: Path):
    def count(*extra: str) -> int:
        result = runner.invoke(app, ["fn", "invoke", str(hostile_fn), "--payload", "count", "--state-dir",
                                     str(state_dir), "--state", str(tmp_path / "mine"), *extra])
        assert result.exit_code == 0, result.output
        return int(result.stdout.split()[-1].strip("'\""))

    assert [count("--fresh"), count(), count(), count("--fresh")] == [1, 2, 3, 1]
    assert (tmp_path / "mine" / "state.sqlite").is_file()
    assert not (state_dir / "state.sqlite").exists()  # the daemon's state is not touched


def test_invoke_bad_payload_prints_error_message(digits_fn: Path, state_dir: Path):
    result = runner.invoke(app, ["fn", "invoke", str(digits_fn), "--topic", "sensors/dev1/digits",
                                 "--payload", '{"id": "bad-1", "pixels": [1, 2, 3]}', "--state-dir", str(state_dir),
                                 "--models", str(MODELS)])
    assert result.exit_code == 1, result.output
    assert lines_on(result.stdout, "results/dev1/digits") == []
    [err] = lines_on(result.stdout, "edgefn/errors/digits")
    assert err["event_id"] == "bad-1"
    assert err["reason"] == "guest-error"
    assert (err["function"], err["version"], err["topic"]) == ("digits", "1.0.0", "sensors/dev1/digits")
    assert "64 numbers" in err["error"]
    assert err["journal_id"] == "invoke-1"


def test_invoke_missing_payload_file(tmp_path: Path, digits_fn: Path, state_dir: Path):
    missing = tmp_path / "missing.json"
    result = runner.invoke(app, ["fn", "invoke", str(digits_fn), "--topic", "sensors/dev1/digits",
                                 "--payload", f"@{missing}", "--state-dir", str(state_dir)])
    assert result.exit_code == 2
    assert f"cannot read {missing}: No such file or directory" in flat(result.output)
    assert "Traceback" not in result.output


def test_invoke_folder_without_manifest(tmp_path: Path, state_dir: Path):
    # A path that looks like rich markup must be printed as written, not parsed (nor crash).
    folder = tmp_path / "[" / "fn]"
    folder.mkdir(parents=True)
    result = runner.invoke(app, ["fn", "invoke", str(folder), "--topic", "sensors/dev1/x",
                                 "--payload", "{}", "--state-dir", str(state_dir)])
    assert result.exit_code == 2, result.output
    assert f"{folder / 'edgefn.toml'}: no manifest" in flat(result.output)


# --- run -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:1883", "127.0.0.1:1883", "mqtt://"])
def test_run_invalid_broker_url(tmp_path: Path, url: str):
    result = runner.invoke(app, ["run", "--broker", url, "--state-dir", str(tmp_path / "state"),
                                 "--functions", str(tmp_path), "--no-build"])
    assert result.exit_code == 2, result.output
    assert "mqtt://" in result.output
    assert "broker" in result.output
    assert "Traceback" not in result.output


BAD_PORTS = {  # a URL whose port is not one: one line, wherever a broker or endpoint URL is given
    "broker": ["run", "--broker", "mqtt://localhost:abc"],
    "broker_with_login": ["run", "--broker", "mqtt://user:secret@localhost:99999"],
    "cloud": ["run", "--cloud", "http://localhost:abc"],
    "fleet": ["run", "--fleet", "https://localhost:0"],
    "cloud_check": ["cloud", "check", "http://localhost:abc", "--models", str(MODELS)],
    "fleet_server": ["fleet", "devices", "--server", "http://user:secret@localhost:abc"],
}


@pytest.mark.parametrize("command", list(BAD_PORTS))
def test_a_url_whose_port_is_not_a_number_is_one_line(state_dir: Path, command: str):
    # `run` with a function that loads: the broker's port used to be parsed only on connecting, a traceback.
    args = BAD_PORTS[command]
    if args[0] == "run":
        args = [*args, "--state-dir", str(state_dir), "--functions", str(DIGITS_FN), "--models", str(MODELS),
                "--no-build"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "is not a number from 1 to 65535" in result.output and "Traceback" not in result.output
    assert "secret" not in result.output


# --- status --------------------------------------------------------------------------------------


def test_status_without_a_daemon_says_how_to_get_one():
    from edgefn.mqtt.local_broker import free_port

    result = runner.invoke(app, ["status", "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert "no daemon answers on http://127.0.0.1:" in result.output and "--metrics-port" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_watch_rebuilds_and_runs_again_on_each_save(tmp_path: Path):
    """`fn watch`: an answer, then after a save the new answer; a syntax error is said at once."""
    import os
    import subprocess
    import sys
    import time

    folder = tmp_path / "probe"
    assert runner.invoke(app, ["fn", "new", "probe", "--dir", str(tmp_path)]).exit_code == 0
    watch = subprocess.Popen([sys.executable, "-m", "edgefn.cli", "fn", "watch", str(folder), "--runs", "3",
                              "--state-dir", str(tmp_path / "state"), "--interval", "0.05"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "COLUMNS": "300"})
    lines: list[str] = []

    def until(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = watch.stdout.readline()
            if not line:
                break
            lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in:\n{''.join(lines)}")

    try:
        until("start -> answer in", 180)
        source = folder / "app.py"
        source.write_text(source.read_text().replace('"keys": sorted', '"edited": True, "keys": sorted'))
        until("(app.py changed) in", 180)  # a rebuild says why, and how long it took
        until('"edited": true', 60)
        until("save -> answer in", 5)
        source.write_text(source.read_text() + "\ndef broken(:\n")
        until(f"error: {source}:", 10)
        said = until("save -> error in", 5)
        # Checked on the host, no componentize-py (a build takes 8 s and more). Timed from this save: when the
        # watcher took the previous save's two writes (truncate, then the bytes) for two saves, its rerun
        # found this source broken and said 16.9 s, from the previous save.
        assert float(said.split(" in ")[1].split()[0]) < 5.0, said
        assert watch.wait(10) == 0
    finally:
        watch.kill()
        watch.wait()
        watch.stdout.close()


def test_watch_takes_a_save_of_two_writes_for_one_save():
    """What the sources' times read while an editor saves: the truncate seen first, the bytes a moment
    later. One save: the watcher returns the times once they stand still, and the save's time is the last
    write's (it used to return the truncate's times, then took the bytes for the next save)."""
    from edgefn.cli.fn import next_save

    app_py = Path("app.py")
    reads = iter([{app_py: 1.0}, {app_py: 2.0}, {app_py: 2.5}, {app_py: 2.5}])  # before, truncated, written
    now, saved_at = next_save(lambda: next(reads), {app_py: 1.0}, 0.0)
    assert now == {app_py: 2.5} and saved_at == 2.5
    assert next(reads, None) is None  # it looked until the times stood still, and no further


# --- edgefn cloud check ---------------------------------------------------------------------------------


def test_cloud_check_says_the_endpoint_can_take_the_functions_models():
    with start_server(MODELS) as cloud:
        result = runner.invoke(app, ["cloud", "check", cloud.url, "-f", str(DIGITS_FN), "-m", str(MODELS), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["ok"] and [m["model"] for m in doc["models"]] == ["digits"]  # only what the function uses
    (digits,) = doc["models"]
    assert digits["ready"] and digits["inputs"] == ["pixels FP32 [-1, 64]"]
    assert digits["outputs"] == ["label INT64 [397]", "probabilities FP32 [397, 10]"]
    assert digits["rows"] == 397 and digits["agreement"] >= 0.95


def test_cloud_check_fails_for_a_model_the_endpoint_cannot_serve():
    with start_server(MODELS) as cloud:
        result = runner.invoke(app, ["cloud", "check", cloud.url, "-m", str(MODELS),
                                     "--cloud-model", "digits=digits-gone"])
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert "digits-gone" in text and "not-served" in text and "404" in text
    assert "digits-cnn" in text  # every model of --models, without --functions
