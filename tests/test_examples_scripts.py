"""The user-facing examples under examples/: each script runs and its own assertions hold.

Every script's `main(argv)` asserts what it claims and returns 0; these tests run
it in-process (the multi-worker one starts its own worker processes) and check
the lines it prints. The Docker walkthrough is not run, but its batching file and
its `tfbn` command lines are parsed with the real parsers.
"""

import re
import shlex

import pytest
from _examples_helpers import EXAMPLES, load, private_tempdir  # noqa: F401 - autouse fixture


def test_quickstart(capsys):
    assert load("quickstart").main([]) == 0
    out = capsys.readouterr().out
    assert "training=True   max |tfbn - keras|" in out and "accuracy" in out
    assert "tfbn.convert_batch_norm(reference): max |tfbn - keras|" in out


def test_blocks(capsys):
    assert load("blocks").main([]) == 0
    out = capsys.readouterr().out
    assert "OK: no BatchNormalization wiring problem found" in out
    assert out.count("[bias-before-bn]") == 3


def test_finetune_frozen_bn(capsys):
    assert load("finetune_frozen_bn").main([]) == 0
    out = capsys.readouterr().out
    assert "BN statistics unchanged by fine-tuning: 4 arrays identical" in out
    assert "statistics update again: True" in out


def test_mirrored_sync_bn(capsys):
    assert load("mirrored_sync_bn").main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 replicas, 4 examples each")
    assert "moving statistics identical on all 4 replicas" in out


@pytest.mark.slow
def test_multiworker_sync_bn(capsys, tmp_path):
    assert load("multiworker_sync_bn").main(["--out", str(tmp_path), "--timeout", "85"]) == 0
    out = capsys.readouterr().out
    assert out.count("2 replicas in sync, 8 batches tracked") == 2
    assert "both workers hold the same moving statistics" in out
    assert sorted(p.name for p in tmp_path.glob("worker*.json")) == ["worker0.json", "worker1.json"]


def _cli_lines(text):
    """The `tfbn ...` command lines in `text` (one command per line)."""
    return [
        shlex.split(line.strip().lstrip("$ "))
        for line in text.splitlines()
        if line.strip().startswith("tfbn ")
    ]


def test_export_serve_check(capsys, tmp_path):
    from tfbn import cli

    assert load("export_serve_check").main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "batch-size invariance over REST: PASS" in out
    assert "batch-size invariance over gRPC: PASS" in out
    # The printed command lines parse, and the export + an in-process check really run.
    commands = _cli_lines(out.split("The same from a shell:")[1])
    assert [c[1] for c in commands] == ["export", "serve", "check", "check"]
    parser = cli.build_parser()
    for command in commands:
        parser.parse_args(command[1:])
    assert cli.main(commands[0][1:]) == 0
    assert cli.main(["check", str(tmp_path / "cli" / "digits" / "1")]) == 0


def test_tf_serving_docker_doc():
    """Not run (no Docker here): its batching file and `tfbn` command lines parse."""
    from tfbn.serving._config import parse_batching_parameters

    from tfbn import cli

    text = (EXAMPLES / "tf_serving_docker.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL)
    batching = [body for lang, body in blocks if "max_batch_size" in body]
    assert len(batching) == 1
    params = parse_batching_parameters(batching[0])
    assert params.max_batch_size == 64 and params.allowed_batch_sizes == (8, 16, 32, 64)
    docker = next(body for lang, body in blocks if "docker run" in body)
    for flag in (
        "-p 127.0.0.1:8500:8500",
        "-p 127.0.0.1:8501:8501",
        "-e MODEL_NAME=digits",
        ":/models/digits",
        "--enable_batching=true",
        "--batching_parameters_file=",
    ):
        assert flag in docker, flag
    commands = [c for lang, body in blocks if lang == "sh" for c in _cli_lines(body)]
    assert {c[1] for c in commands} == {"check", "serve"}
    checks = [c for c in commands if c[1] == "check"]
    assert {"--rest", "--grpc"} <= {arg for c in checks for arg in c} and all(
        "--concurrent" in c for c in checks
    )
    parser = cli.build_parser()
    for command in commands:
        parser.parse_args(command[1:])
