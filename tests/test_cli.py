"""The `tfbn` command as a tool: TensorFlow-free help and argument errors, quiet
start-up, one flag style with deprecated aliases, one meaning of --json, and a
clear message when the `serving` extra is missing."""

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata

import keras
import pytest
from _serving_helpers import HALF_PLUS_TWO_TF2
from tfbn.serving import _flags as _serving_flags

import tfbn
from tfbn import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(extra)
    return env


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(**env),
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.keras"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), tfbn.BatchNormalization()])
    model.save(path)
    return str(path)


# --- TensorFlow-free until a command runs ------------------------------------------------


def test_help_version_and_argument_errors_do_not_import_tensorflow():
    code = """
import sys
from tfbn import cli
codes = []
for argv in (["--help"], ["--version"], *[[c.name, "--help"] for c in cli.COMMANDS],
             ["check", "m", "--batch-sizes", "0"], ["nosuchcommand"], ["lint"],
             ["bench", "--sync", "--replicas", "1"], ["export", "missing.keras", "base"],
             ["serve", "--batching_parameters_file", "b.txt"]):
    try:
        codes.append(cli.main(argv))
    except SystemExit as exit:
        codes.append(exit.code)
print(codes, file=sys.stderr)
print(sorted(m for m in ("tensorflow", "keras", "numpy") if m in sys.modules))
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    codes = eval(done.stderr.strip().splitlines()[-1])
    assert codes == [0, 0] + [0] * len(cli.COMMANDS) + [2, 2, 2, 2, 2, 2]


def test_version_comes_from_the_installed_metadata(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"tfbn {metadata.version('tfbn')}"
    assert metadata.version("tfbn") == tfbn.__version__


def test_tensorflow_start_up_logs_are_silenced_unless_verbose(model_file):
    """Run as a user would: no TF_CPP_MIN_LOG_LEVEL in the environment."""
    code = "import sys; from tfbn import cli; sys.exit(cli.main(sys.argv[1:]))"
    quiet = subprocess.run(
        [sys.executable, "-c", code, "inspect", model_file],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert quiet.returncode == 1  # never-updated statistics are a finding
    assert "never_updated" in quiet.stdout
    assert quiet.stderr == ""
    verbose = subprocess.run(
        [sys.executable, "-c", code, "inspect", model_file, "--verbose"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert verbose.returncode == 1 and "never_updated" in verbose.stdout
    # What TensorFlow logs depends on the machine; with --verbose it is not hidden.
    assert "TF_CPP_MIN_LOG_LEVEL" not in verbose.stderr


def test_verbose_keeps_tensorflow_log_level_untouched(monkeypatch, model_file, capsys):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert cli.main(["-v", "inspect", model_file]) == 1
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    assert cli.main(["inspect", model_file]) == 1
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    capsys.readouterr()


# --- one flag style -------------------------------------------------------------------------


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_text():
    parser = cli.build_parser()
    missing = []
    for name, sub in {"tfbn": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, cli._DeprecatedAlias):
                assert action.help == argparse.SUPPRESS  # hidden; the canonical one has help
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


# tensorflow_model_server's own flag names (kept as TF Serving spells them): every flag
# of the server's table (tfbn.serving._flags.FLAGS lists tensorflow_model_server 2.21's).
TF_SERVING_FLAGS = {f"--{flag.name}" for flag in _serving_flags.FLAGS}
assert {
    "--port",
    "--rest_api_port",
    "--model_name",
    "--model_base_path",
    "--model_config_file",
    "--enable_batching",
    "--batching_parameters_file",
    "--file_system_poll_wait_seconds",
} <= TF_SERVING_FLAGS


def test_tfbn_options_are_kebab_case_and_tf_serving_flags_keep_their_spelling():
    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if isinstance(action, cli._DeprecatedAlias):
                continue
            for flag in action.option_strings:
                if flag in TF_SERVING_FLAGS:
                    continue
                assert "_" not in flag, f"tfbn {name} {flag}: tfbn's own options are kebab-case"
    serve_flags = {f for a in _subparsers(parser)["serve"]._actions for f in a.option_strings}
    assert TF_SERVING_FLAGS <= serve_flags
    check_flags = {f for a in _subparsers(parser)["check"]._actions for f in a.option_strings}
    assert {"--model_name", "--enable_batching", "--batching_parameters_file"} <= check_flags


@pytest.mark.parametrize(
    "argv, dest, value, old",
    [
        (["check", "m", "--num_examples", "5"], "num_examples", 5, "--num_examples"),
        (["check", "m", "--batch_sizes", "1,all"], "batch_sizes", (1, None), "--batch_sizes"),
        (["check", "m", "--concurrent_rounds", "2"], "concurrent_rounds", 2, "--concurrent_rounds"),
        (["check", "--rest", "u", "--model_version", "3"], "model_version", 3, "--model_version"),
        (
            ["check", "--rest", "u", "--model_version_label", "s"],
            "model_version_label",
            "s",
            "--model_version_label",
        ),
        (["check", "m", "--signature_name", "s"], "signature_name", "s", "--signature_name"),
        (["export", "m.keras", "base", "--version", "7"], "model_version", "7", "--version"),
        (["export", "m.keras", "base", "--model-name", "n"], "model_name", "n", "--model-name"),
        (["serve", "--max_request_bytes", "10"], "max_request_bytes", 10, "--max_request_bytes"),
        (["lint", "m.keras", "--batch_size", "8"], "batch_size", 8, "--batch_size"),
    ],
)
def test_old_spellings_still_parse_with_a_deprecation_warning(argv, dest, value, old, capsys):
    args = cli.build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert f"{old} is deprecated; use --" in err
    canonical = err.split("use ")[1].split()[0]
    new_argv = [canonical if a == old else a for a in argv]
    assert getattr(cli.build_parser().parse_args(new_argv), dest) == value
    assert capsys.readouterr().err == ""


def test_export_model_version_is_not_the_program_version(capsys):
    args = cli.build_parser().parse_args(["export", "m.keras", "base", "--model-version", "4"])
    assert args.model_version == "4"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("tfbn ")


def test_deprecated_alias_keeps_mutual_exclusion(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.build_parser().parse_args(
            ["check", "--rest", "u", "--model-version", "1", "--model_version_label", "x"]
        )
    assert exit.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# --- --json: a path, '-' for stdout, everywhere -------------------------------------------


def test_inspect_json_before_the_model_path_prints_json(model_file, capsys):
    assert cli.main(["inspect", "--json", model_file]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["layers"][0]["flags"] == ["never_updated"]


@pytest.mark.parametrize("command", ["inspect", "lint"])
def test_json_means_a_path_or_dash_for_stdout(command, model_file, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli.main([command, model_file, "--json", str(out)])
    printed = capsys.readouterr().out
    assert not printed.lstrip().startswith("{")  # the table, and the JSON in the file
    from_file = json.loads(out.read_text())
    assert cli.main([command, model_file, "--json", "-"]) == code
    assert json.loads(capsys.readouterr().out) == from_file
    assert cli.main([command, "--json", model_file]) == code
    assert json.loads(capsys.readouterr().out) == from_file


@pytest.mark.skipif(not os.path.isdir(HALF_PLUS_TWO_TF2), reason="TF Serving fixtures not found")
def test_check_json_dash_prints_the_report_as_json(capsys):
    argv = ["--orders", "1", "--num-examples", "8", "--batch-sizes", "1,all"]
    assert cli.main(["check", HALF_PLUS_TWO_TF2, *argv, "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert cli.main(["check", "--json", HALF_PLUS_TWO_TF2, *argv]) == 0
    assert json.loads(capsys.readouterr().out) == report


@pytest.mark.parametrize("command", ["inspect", "lint"])
def test_a_closed_pipe_ends_the_command_quietly(command, model_file):
    """`tfbn inspect --json - m.keras | head -1`: no BrokenPipeError traceback; the exit
    status of a process killed by SIGPIPE (128 + 13), as `yes | head -1` gives.
    (`--help` is argparse's: it ignores a closed pipe and exits 0.)"""
    argv = [command, "--json", "-", model_file]
    code = "import sys; from tfbn import cli; sys.exit(cli.main(sys.argv[1:]))"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written: deterministic
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env=_env(),
        )
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141


def test_missing_path_is_a_usage_error(capsys):
    assert cli.main(["inspect"]) == 2
    assert "PATH is required" in capsys.readouterr().err


# --- the serving extra ----------------------------------------------------------------------


@pytest.fixture
def without_serving_extra(monkeypatch):
    """As in an environment installed without `tfbn[serving]`."""
    for name in ("tensorflow_serving", "grpc"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    "argv, what",
    [
        (["serve", "--model_base_path", "/nonexistent"], "tfbn serve"),
        (["check", "--grpc", "127.0.0.1:9", "--model_name", "m"], "tfbn check --grpc"),
    ],
)
def test_commands_needing_the_serving_extra_say_which_to_install(
    argv, what, without_serving_extra, capsys
):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{what} needs the 'serving' extra" in err
    assert "pip install 'tfbn[serving]'" in err
    assert "Traceback" not in err
