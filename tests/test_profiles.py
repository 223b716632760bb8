"""Device profiles: every shipped profile validates; each device is detected from a fake root holding the strings
it really reports (tests/devices/<profile>/); a broken profile file names the file and the field; sensors and
pressure read fake trees; and `edgefn profile ...`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.errors import ProfileError
from edgefn.profiles import (
    SHIPPED,
    Memory,
    Profile,
    ThermalZone,
    detect,
    get_profile,
    load_profiles,
    machine_arch,
    pressure,
    read_memory,
    read_profile,
    read_thermal,
)

DEVICES = Path(__file__).parent / "devices"
PROFILES = load_profiles()
# Fake roots of devices that no profile names (beside those of the generic profiles themselves), and the
# profile each must fall back to.
UNKNOWN = {"aarch64-server": "generic-aarch64"}
KINDS = ["raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "coral-dev-board",
         "rockchip-rk3588", "generic-x86_64", "generic-aarch64"]

runner = CliRunner(env={"COLUMNS": "400"})


def flat(text: str) -> str:
    return " ".join(text.split())


def fake_root(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    root = tmp_path / "root"
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    root.mkdir(exist_ok=True)
    return root


ARM_CPUINFO = "processor\t: 0\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd03\n"


def edited(tmp_path: Path, base: str, old: str, new: str, name: str | None = None) -> Path:
    """A copy of a shipped profile with `old` replaced by `new`, as tmp_path/<name or base>.toml."""
    text = (SHIPPED / f"{base}.toml").read_text()
    assert old in text, old
    text = text.replace(old, new, 1)
    if name is not None:
        text = text.replace(f'name = "{base}"', f'name = "{name}"', 1)
    path = tmp_path / f"{name or base}.toml"
    path.write_text(text)
    return path


# --- the shipped profiles ----------------------------------------------------------------------------


def test_shipped_profiles_cover_every_kind():
    assert set(KINDS) <= set(PROFILES)
    assert {p.arch for p in PROFILES.values() if p.generic} == {"x86_64", "aarch64"}


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_profile_validates(path: Path):
    profile = read_profile(path)
    assert profile.name == path.stem and profile.source == path
    assert profile.delegates_for("onnxruntime"), "every device has at least onnxruntime's CPU provider"
    assert profile.delegates_for("onnxruntime")[-1].provider == "CPUExecutionProvider"
    if not profile.generic:
        strongest = max(rule.score for rule in profile.match.rules)
        assert strongest >= profile.match.min_score, "one rule alone (the device-tree model) must match"


def test_delegates_for_takes_backends_and_formats():
    jetson = PROFILES["jetson-orin-nano"]
    assert [d.name for d in jetson.delegates_for("onnxruntime")] == ["tensorrt", "cuda", "cpu"]
    assert jetson.delegates_for("onnx") == jetson.delegates_for("onnxruntime")
    assert [d.name for d in PROFILES["coral-dev-board"].delegates_for("tflite")] == ["edgetpu", "xnnpack", "cpu"]
    assert PROFILES["coral-dev-board"].delegates_for("tflite")[0].requires_variant == "tflite-edgetpu"
    rknn = PROFILES["rockchip-rk3588"].delegates_for("rknn")
    assert [(d.library, d.requires_variant) for d in rknn] == [("librknnrt.so", "rknn")]
    assert PROFILES["raspberry-pi-4"].delegates_for("rknn") == []
    with pytest.raises(ProfileError, match="no backend 'tensorflow'"):
        jetson.delegates_for("tensorflow")


def test_variant_preference_per_device():
    assert PROFILES["jetson-nano"].variant_preference == ["fp32", "fp16", "int8"]
    assert PROFILES["raspberry-pi-5"].variant_preference[0] == "int8"


def test_options_in_fills_the_state_dir(tmp_path: Path):
    tensorrt = PROFILES["jetson-orin-nano"].delegates_for("onnxruntime")[0]
    options = tensorrt.options_in(tmp_path)
    assert options["trt_engine_cache_path"] == f"{tmp_path}/tensorrt"
    assert options["trt_fp16_enable"] is True
    assert tensorrt.options["trt_engine_cache_path"] == "{state_dir}/tensorrt"  # the profile is left as it was


def test_get_profile_unknown_lists_the_known_ones():
    with pytest.raises(ProfileError, match=r"no device profile named 'pi-6' \(known: coral-dev-board, "):
        get_profile("pi-6")


def test_load_profiles_later_folder_replaces(tmp_path: Path):
    edited(tmp_path, "raspberry-pi-4", "min_free_mb = 256", "min_free_mb = 1000")
    edited(tmp_path, "raspberry-pi-4", 'contains = "0xd08"', 'contains = "0xd08"', name="my-board")
    both = load_profiles([SHIPPED, tmp_path])
    assert both["raspberry-pi-4"].limits.memory.min_free_mb == 1000
    assert both["raspberry-pi-4"].source == tmp_path / "raspberry-pi-4.toml"
    assert set(both) == set(PROFILES) | {"my-board"}
    assert set(load_profiles([tmp_path])) == {"raspberry-pi-4", "my-board"}


def test_load_profiles_missing_folder(tmp_path: Path):
    with pytest.raises(ProfileError, match="no such folder of device profiles"):
        load_profiles([tmp_path / "missing"])


def test_load_profiles_two_generic_profiles_of_one_arch(tmp_path: Path):
    shutil.copy(SHIPPED / "generic-aarch64.toml", tmp_path)
    edited(tmp_path, "generic-aarch64", "cores = 4", "cores = 8", name="generic-arm")
    with pytest.raises(ProfileError, match="generic-arm.toml: profile.generic: generic-aarch64 .* is already the "
                                           "generic profile of aarch64"):
        load_profiles([tmp_path])


# --- broken profile files ----------------------------------------------------------------------------

PI4_CPU = '{ name = "cpu", provider = "CPUExecutionProvider" }'
BROKEN = {
    "missing field": (PI4_CPU, '{ name = "cpu" }', "delegates.onnxruntime.0.provider: Field required"),
    "wrong type": ("cores = 4", 'cores = "four"', "hardware.cores: Input should be a valid integer"),
    "unknown key": ("cores = 4", 'cores = 4\ncolour = "red"', "hardware.colour: Extra inputs are not permitted"),
    "bad TOML": ("[hardware]", "[hardware", "invalid TOML: "),
    "unknown precision": ('["int8", "fp32", "fp16"]', '["int4", "fp32"]',
                          "delegates.variant_preference.0: Input should be 'int8', 'fp16' or 'fp32'"),
    "repeated precision": ('["int8", "fp32", "fp16"]', '["int8", "int8"]',
                           "delegates: Value error, variant_preference names a precision twice"),
    "provider on LiteRT": ('{ name = "xnnpack", builtin = true }',
                           '{ name = "xnnpack", builtin = true, provider = "CPUExecutionProvider" }',
                           "delegates.litert.1.provider: not allowed for this backend"),
    "LiteRT delegate with nothing to run": ('{ name = "xnnpack", builtin = true }', '{ name = "xnnpack" }',
                                            "delegates.litert.1: Value error, a LiteRT delegate has either a "
                                            "library or builtin = true"),
    "rule without its field": ('field = "CPU part"\n', "", "match.rules.4.cpuinfo.field: Field required"),
    "rule of an unknown source": ('source = "compatible"', 'source = "dmi"', "match.rules.3: Input tag 'dmi'"),
    "thermal limits upside down": ("critical_c = 85", "critical_c = 70",
                                   "limits.thermal: Value error, critical_c must be above throttle_c"),
    "missing section": ("[capacity]\ninstances = 2\nqueue_bound = 256\nlatency_budget_ms = 150\n", "",
                        "capacity: Field required"),
}


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_broken_profile_names_file_and_field(tmp_path: Path, case: str):
    old, new, message = BROKEN[case]
    path = edited(tmp_path, "raspberry-pi-4", old, new)
    with pytest.raises(ProfileError) as caught:
        read_profile(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    with pytest.raises(ProfileError, match="raspberry-pi-4.toml: "):  # the same through a folder
        load_profiles([tmp_path])


def test_profile_named_unlike_its_file(tmp_path: Path):
    path = tmp_path / "pi.toml"
    shutil.copy(SHIPPED / "raspberry-pi-4.toml", path)
    with pytest.raises(ProfileError, match=r"pi.toml: profile.name: 'raspberry-pi-4' is not the file's name 'pi'"):
        read_profile(path)


def test_generic_profile_with_rules(tmp_path: Path):
    path = edited(tmp_path, "generic-aarch64", "[hardware]",
                  '[[match.rules]]\nsource = "model"\ncontains = "x"\nscore = 100\n\n[hardware]')
    with pytest.raises(ProfileError, match="a generic profile has no match rules"):
        read_profile(path)


def test_profile_file_not_utf8_or_missing(tmp_path: Path):
    (tmp_path / "x.toml").write_bytes(b"\xff\xfe[profile]")
    with pytest.raises(ProfileError, match="x.toml: not UTF-8 text"):
        read_profile(tmp_path / "x.toml")
    with pytest.raises(ProfileError, match="y.toml: file not found"):
        read_profile(tmp_path / "y.toml")


# --- detection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_detect_each_profile_from_its_fake_root(name: str):
    root = DEVICES / name
    assert root.is_dir(), f"profile {name} has no fake root: add {root.relative_to(DEVICES.parent.parent)}/"
    found = detect(root)
    assert found.profile.name == name, found.evidence
    assert found.fallback is PROFILES[name].generic
    assert found.evidence[-1].startswith(f"{name}: chosen")


def test_every_fake_root_is_expected():
    assert {d.name for d in DEVICES.iterdir() if d.is_dir()} == set(PROFILES) | set(UNKNOWN)


@pytest.mark.parametrize("device", [*UNKNOWN, "generic-aarch64", "generic-x86_64"])
def test_unknown_devices_fall_back_to_the_generic_profile_of_their_arch(device: str):
    expected = UNKNOWN.get(device, device)
    found = detect(DEVICES / device)
    assert (found.profile.name, found.fallback) == (expected, True)
    arch = PROFILES[expected].arch
    assert any(line.startswith(f"no device profile matched; arch: {arch} (proc/cpuinfo") for line in found.evidence)
    assert found.evidence[-1] == f"{expected}: chosen, the generic profile of {arch}"


def test_an_accelerator_on_another_arch_does_not_make_it_that_board():
    # The NUC holds a PCIe Coral: /dev/apex_0 is there, but the Coral Dev Board is an aarch64 profile.
    found = detect(DEVICES / "generic-x86_64")
    assert "coral-dev-board: +30 dev/apex_0 exists" in found.evidence
    assert "coral-dev-board: passed over, it is for aarch64 and this is x86_64" in found.evidence


def test_weak_evidence_alone_does_not_match():
    # The RockPro64's Cortex-A72 is the Pi 4's CPU part: a hint, not a match.
    found = detect(DEVICES / "generic-aarch64")
    assert "raspberry-pi-4: score 10, below its min_score 50" in found.evidence


def test_detect_reads_the_strings_as_the_devices_write_them():
    found = detect(DEVICES / "jetson-nano")
    assert "proc/device-tree/model: 'NVIDIA Jetson Nano Developer Kit'" in found.evidence  # no trailing NUL
    assert "jetson-nano: +60 nv_tegra_release contains '# R32 (release)'" in found.evidence
    assert "jetson-nano: +80 device-tree compatible is 'nvidia,tegra210'" in found.evidence
    assert "jetson-orin-nano: score 30, below its min_score 50" in found.evidence  # /dev/nvhost-ctrl-gpu alone


@pytest.mark.parametrize(("model", "expected"), [
    ("Raspberry Pi 4 Model B Rev 1.1", "raspberry-pi-4"),
    ("Raspberry Pi 400 Rev 1.0", "raspberry-pi-4"),
    ("Raspberry Pi Compute Module 4 Rev 1.0", "raspberry-pi-4"),
    ("Raspberry Pi Compute Module 4S Rev 1.0", "generic-aarch64"),  # a BCM2837: a Pi 3
    ("Raspberry Pi 3 Model B Rev 1.2", "generic-aarch64"),
    ("Raspberry Pi 500 Rev 1.0", "raspberry-pi-5"),
    ("Raspberry Pi Compute Module 5 Rev 1.0", "raspberry-pi-5"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano"),
    ("Google i.MX8MQ Phanbell", "coral-dev-board"),
    ("Radxa ROCK 5 Model B", "rockchip-rk3588"),
    ("Xunlong Orange Pi 5", "rockchip-rk3588"),
    ("Orange Pi 5 Plus", "rockchip-rk3588"),
    ("Rockchip RK3588 EVB1 LP4 V10 Board", "rockchip-rk3588"),
])
def test_detect_by_device_tree_model(tmp_path: Path, model: str, expected: str):
    root = fake_root(tmp_path, {"proc/device-tree/model": model.encode() + b"\0", "proc/cpuinfo": ARM_CPUINFO})
    assert detect(root).profile.name == expected


def test_detect_a_jetson_by_its_release_file_alone(tmp_path: Path):
    # An Orin NX has no profile of its own; JetPack 6 and the GPU node make the Orin Nano's the closest.
    root = fake_root(tmp_path, {
        "proc/device-tree/model": b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0",
        "etc/nv_tegra_release": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n",
        "dev/nvhost-ctrl-gpu": "", "proc/cpuinfo": ARM_CPUINFO})
    found = detect(root)
    assert (found.profile.name, found.fallback) == ("jetson-orin-nano", False)
    assert found.evidence[-1] == "jetson-orin-nano: chosen, score 90"


def test_detect_tie_goes_to_priority_then_name(tmp_path: Path):
    edited(tmp_path, "raspberry-pi-4", "priority = 0", "priority = 0", name="b-board")
    edited(tmp_path, "raspberry-pi-4", "priority = 0", "priority = 0", name="a-board")
    shutil.copy(SHIPPED / "generic-aarch64.toml", tmp_path)
    root = DEVICES / "raspberry-pi-4"
    assert detect(root, load_profiles([tmp_path])).profile.name == "a-board"
    edited(tmp_path, "raspberry-pi-4", "priority = 0", "priority = 5", name="b-board")
    assert detect(root, load_profiles([tmp_path])).profile.name == "b-board"


def test_detect_a_root_that_says_nothing(tmp_path: Path):
    with pytest.raises(ProfileError, match="no device profile matches, and there is no generic profile for arch "
                                           "unknown .proc/cpuinfo gives no hint of the arch"):
        detect(fake_root(tmp_path, {}))
    with pytest.raises(ProfileError, match="no such folder to detect the device under"):
        detect(tmp_path / "missing")


def test_detect_this_machine():
    found = detect()
    arch, _ = machine_arch()
    if arch in ("x86_64", "aarch64"):
        assert found.profile.arch == arch
    assert found.evidence


# --- sensors and pressure ----------------------------------------------------------------------------


def test_read_thermal_jetson_nano():
    zones = read_thermal(DEVICES / "jetson-nano")
    assert [z.type for z in zones] == ["AO-therm", "CPU-therm", "GPU-therm", "PLL-therm", "PMIC-Die",
                                       "thermal-fan-est"]
    assert zones[1] == ThermalZone("thermal_zone1", "CPU-therm", 36.5)


def test_read_thermal_skips_zones_that_do_not_answer():
    zones = read_thermal(DEVICES / "jetson-orin-nano")
    assert "cv0-thermal" not in {z.type for z in zones}
    assert [z.type for z in zones][-1] == "tj-thermal"


def test_read_thermal_includes_the_edge_tpu():
    assert ThermalZone("apex_0", "edgetpu", 45.55) in read_thermal(DEVICES / "coral-dev-board")


def test_read_thermal_odd_values_and_order(tmp_path: Path):
    root = fake_root(tmp_path, {
        "sys/class/thermal/thermal_zone10/type": "ten\n", "sys/class/thermal/thermal_zone10/temp": "30000\n",
        "sys/class/thermal/thermal_zone2/type": "two\n", "sys/class/thermal/thermal_zone2/temp": "20000\n",
        "sys/class/thermal/thermal_zone3/type": "garbage\n", "sys/class/thermal/thermal_zone3/temp": "n/a\n",
        "sys/class/thermal/thermal_zone4/type": "unset\n", "sys/class/thermal/thermal_zone4/temp": "-273150\n",
        "sys/class/thermal/thermal_zone5/temp": "41000\n",  # no type file
    })
    (root / "sys/class/thermal/thermal_zone6/temp").mkdir(parents=True)  # not a file
    assert [(z.type, z.celsius) for z in read_thermal(root)] == [("two", 20.0), ("thermal_zone5", 41.0),
                                                                 ("ten", 30.0)]


def test_read_memory():
    assert read_memory(DEVICES / "raspberry-pi-4") == Memory(total_mb=3794, available_mb=3310)


def test_read_memory_without_memavailable(tmp_path: Path):
    root = fake_root(tmp_path, {"proc/meminfo": "MemTotal: 1024000 kB\nMemFree: 102400 kB\nBuffers: 10240 kB\n"
                                                "Cached: 204800 kB\n"})
    assert read_memory(root) == Memory(1000, 310)


def test_sensors_on_a_root_with_nothing(tmp_path: Path):
    root = fake_root(tmp_path, {})
    assert read_thermal(root) == [] and read_memory(root) is None
    now = pressure(PROFILES["raspberry-pi-4"], root)
    assert (now.thermal, now.memory, now.hottest, now.mem, now.reasons, now.ok) == (
        "unknown", "unknown", None, None, [], True)


def test_pressure_counts_only_the_profiles_zones():
    # PMIC-Die always reads 100 °C on a Nano; the profile counts CPU-therm and GPU-therm only.
    now = pressure(PROFILES["jetson-nano"], DEVICES / "jetson-nano")
    assert (now.thermal, now.memory, now.ok) == ("ok", "ok", True)
    assert now.hottest == ThermalZone("thermal_zone1", "CPU-therm", 36.5)
    everything = pressure(PROFILES["generic-aarch64"], DEVICES / "jetson-nano")  # zones = []: all count
    assert everything.hottest is not None and everything.hottest.type == "PMIC-Die"
    assert everything.thermal == "critical"


@pytest.mark.parametrize(("milli", "state"), [("79999", "ok"), ("80000", "throttle"), ("84500", "throttle"),
                                              ("85000", "critical")])
def test_pressure_thermal_states(tmp_path: Path, milli: str, state: str):
    root = tmp_path / "pi"
    shutil.copytree(DEVICES / "raspberry-pi-4", root)
    (root / "sys/class/thermal/thermal_zone0/temp").write_text(milli + "\n")
    now = pressure(PROFILES["raspberry-pi-4"], root)
    assert (now.thermal, now.ok) == (state, state == "ok")
    if state == "critical":
        assert now.reasons == ["cpu-thermal (thermal_zone0) at 85 °C: at or above critical_c 85 °C"]


def test_pressure_memory_low(tmp_path: Path):
    root = fake_root(tmp_path, {"proc/meminfo": "MemTotal: 1004064 kB\nMemFree: 50000 kB\nMemAvailable: 102400 kB\n"})
    now = pressure(PROFILES["coral-dev-board"], root)
    assert (now.memory, now.mem, now.ok) == ("low", Memory(980, 100), False)
    assert now.reasons == ["100 MB available: below min_free_mb 128 MB"]


# --- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["profile"], ["profile", "detect"], ["profile", "list"], ["profile", "show"]],
                         ids=" ".join)
def test_profile_help(command: list[str]):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_cli_detect_text():
    result = runner.invoke(app, ["profile", "detect", "--root", str(DEVICES / "coral-dev-board")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("coral-dev-board (Coral Dev Board")
    assert "\nmatched\n" in result.output
    assert "coral-dev-board: +100 device-tree model contains 'i.MX8MQ Phanbell'" in result.output
    assert "now: cpu-thermal 47.0 °C (ok), 558 of 980 MB available (ok)" in result.output


def test_cli_detect_json_fallback():
    result = runner.invoke(app, ["profile", "detect", "--root", str(DEVICES / "generic-aarch64"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["profile"], doc["fallback"]) == ("generic-aarch64", True)
    assert doc["evidence"][-1] == "generic-aarch64: chosen, the generic profile of aarch64"
    assert doc["pressure"]["thermal"] == "ok" and doc["pressure"]["ok"] is True
    assert doc["pressure"]["hottest"] == {"zone": "thermal_zone0", "type": "cpu-thermal", "celsius": 41.875}


def test_cli_detect_missing_root(tmp_path: Path):
    result = runner.invoke(app, ["profile", "detect", "--root", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert flat(result.output) == f"error: {tmp_path / 'nope'}: no such folder to detect the device under"


def test_cli_list():
    result = runner.invoke(app, ["profile", "list"])
    assert result.exit_code == 0, result.output
    for name in PROFILES:
        assert name in result.output
    assert "tensorrt, cuda, cpu" in result.output
    doc = json.loads(runner.invoke(app, ["profile", "list", "--json"]).output)
    assert [p["name"] for p in doc] == list(PROFILES)
    assert doc[0]["source"] == str(SHIPPED / f"{doc[0]['name']}.toml")


def test_cli_show():
    result = runner.invoke(app, ["profile", "show", "jetson-nano"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for expected in ("jetson-nano: NVIDIA Jetson Nano", "+100 model contains 'NVIDIA Jetson Nano'",
                     "variant preference: fp32 > fp16 > int8", "TensorrtExecutionProvider",
                     "trt_fp16_enable=true", "throttle at 90 °C, critical at 97 °C", "capacity: 2 instances"):
        assert expected in text, expected


def test_cli_show_json_is_the_whole_profile():
    result = runner.invoke(app, ["profile", "show", "rockchip-rk3588", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc.pop("source") == str(SHIPPED / "rockchip-rk3588.toml")
    assert Profile.model_validate(doc).model_dump() == PROFILES["rockchip-rk3588"].model_dump()


def test_cli_show_unknown():
    result = runner.invoke(app, ["profile", "show", "pi-6"])
    assert result.exit_code == 2
    assert flat(result.output).startswith("error: no device profile named 'pi-6' (known: coral-dev-board,")


def test_cli_extra_profiles_folder(tmp_path: Path):
    edited(tmp_path, "raspberry-pi-4", "cores = 4", "cores = 4", name="my-board")
    result = runner.invoke(app, ["profile", "list", "--json", "--profiles", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "my-board" in [p["name"] for p in json.loads(result.output)]
    edited(tmp_path, "raspberry-pi-4", "cores = 4", 'cores = "four"', name="my-board")
    result = runner.invoke(app, ["profile", "show", "my-board", "--profiles", str(tmp_path)])
    assert result.exit_code == 2
    assert flat(result.output) == (f"error: {tmp_path / 'my-board.toml'}: hardware.cores: Input should be a valid "
                                   "integer, unable to parse string as an integer")


def test_every_shipped_profile_gives_its_instances_a_memory_budget():
    for profile in load_profiles().values():
        budget = profile.capacity.memory_budget_mb
        assert budget is not None and 64 <= budget <= profile.hardware.memory_mb // 4, profile.name
