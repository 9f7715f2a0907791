from tfbn import cli


def test_bench_runs_and_reports_ratios(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--shape", "8,4,4,3", "--repeats", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for impl in ("tfbn", "keras", "keras_xla", "raw_fused"):
        assert f"| {impl} |" in table
    assert out.exists()
