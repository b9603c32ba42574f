"""`residency simulate` on bad input: one `error: ...` line and exit status 2, never a traceback.

Also: a cluster with no schedulable node is simulated (nothing served), a cluster with no node at all is
refused before any planning, and a scenario file's own seed is kept unless --seed is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from residency.cli import app
from residency_operator.simulator import policies
from residency_operator.simulator.cluster import load_scenario
from residency_operator.simulator.runner import parse_generate_spec, scenario_requests
from residency_operator.simulator.trace import read_trace_csv

CSV_HEADER = "arrival_seconds,model,prompt_tokens,output_tokens\n"

SMALL_SCENARIO = """\
name: small
seed: 3
duration_seconds: 30
cluster:
  - {preset: l4, count: 1}
models:
  - {name: ns/llama-1b, family: llama-1b, slo: 5}
workload: {pattern: poisson, total_rate_per_second: 1.0}
"""
"""One small model on one L4 for 30 s with the documented ``slo:`` key: simulates in well under a second."""


def simulate(*args: str) -> Result:
    return CliRunner().invoke(app, ["simulate", *args])


def assert_refused(result: Result, expected: str) -> None:
    """Exit status 2, and exactly one stderr line: ``error: `` and a message naming the problem."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("nan,llama-8b,100,10\n", "trace.csv:2: arrival_seconds must be a finite number, got 'nan'"),
        ("inf,llama-8b,10,3\n", "arrival_seconds must be a finite number, got 'inf'"),
        ("-5,llama-8b,100,10\n", "arrival_seconds must be >= 0, got '-5'"),
        ("1,llama-8b,-10,-3\n", "prompt_tokens must be >= 1, got '-10'"),
        ("1,llama-8b,100,10\n2,llama-8b,100,-5000\n", "trace.csv:3: output_tokens must be >= 1, got '-5000'"),
        ("1,,10,3\n", "no value for model"),
        ("0.5,llama-8b,100,abc\n", "output_tokens must be a whole number, got 'abc'"),
        ("", "the trace has no requests"),
    ],
    ids=[
        "nan-arrival",
        "inf-arrival",
        "negative-arrival",
        "negative-tokens",
        "negative-output",
        "no-model",
        "bad-int",
        "empty",
    ],
)
def test_bad_trace_rows_are_refused(tmp_path: Path, rows: str, expected: str) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(CSV_HEADER + rows)
    assert_refused(simulate("--trace", str(trace), "--policy", "binpack", "--out", str(tmp_path)), expected)


@pytest.mark.parametrize(
    ("cluster_yaml", "expected"),
    [
        ("cluster: [\n", "invalid YAML"),
        ("[1, 2]\n", "node entry 1 must be a mapping"),
        ("just a string\n", "expected a list of nodes"),
        ("cluster:\n  - {preset: l4, count: two}\n", "count must be a whole number, got 'two'"),
        ("cluster:\n  - {count: 1}\n", "missing `preset`"),
        ("cluster:\n  - {preset: l4, gpu_memory_gib: -5}\n", "gpu_memory_gib must be > 0, got -5"),
        ("cluster:\n  - {preset: l4, hbm_gbps: 0}\n", "hbm_gbps must be > 0"),
        ("cluster:\n  - {preset: l4, bogus_field: 1}\n", "unknown key 'bogus_field'"),
        ("cluster:\n  - {preset: l4, cordoned: 'no'}\n", "cordoned must be true or false"),
        ("cluster: []\n", "the cluster has no nodes"),
    ],
    ids=[
        "yaml-syntax",
        "int-list",
        "string",
        "count-text",
        "no-preset",
        "negative-memory",
        "zero-bandwidth",
        "unknown-key",
        "cordoned-text",
        "empty",
    ],
)
def test_bad_cluster_files_are_refused(tmp_path: Path, cluster_yaml: str, expected: str) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(cluster_yaml)
    result = simulate(
        "--generate", "poisson:models=1,duration=10", "--cluster", str(cluster), "--out", str(tmp_path)
    )
    assert_refused(result, expected)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("weird:", "unknown pattern 'weird'"),
        ("poisson:models=0", "models must be >= 1"),
        ("poisson:duration=-5", "duration must be > 0"),
        ("poisson:duration=nan", "duration must be a finite number"),
        ("poisson:slo=0", "slo (decode tokens/s) must be > 0"),
        ("poisson:rate=-1", "rate must be >= 0"),
        ("poisson:modles=2", "unknown option 'modles'"),
        ("missing.yaml", "scenario file missing.yaml not found"),
    ],
)
def test_bad_generate_specs_are_refused(tmp_path: Path, spec: str, expected: str) -> None:
    assert_refused(simulate("--generate", spec, "--policy", "binpack", "--out", str(tmp_path)), expected)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("seed: 3", "sed: 3"), "unknown key 'sed'"),
        (("slo: 5", "slo: 0"), "model ns/llama-1b: slo (decode tokens/s) must be > 0"),
        (("slo: 5", "slo: 5, max_batch: 0"), "max_batch must be >= 1"),
        (("family: llama-1b", "family: nosuch"), "unknown model family 'nosuch'"),
        (("pattern: poisson", "pattern: chaotic"), "unknown workload pattern 'chaotic'"),
        (("total_rate_per_second: 1.0", "total_rate_per_second: 1.0, burst_fator: 2"), "'burst_fator'"),
        (("duration_seconds: 30", "duration_seconds: .nan"), "duration_seconds must be a finite number"),
    ],
)
def test_bad_scenario_files_are_refused(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL_SCENARIO.replace(*change))
    assert_refused(simulate("--generate", str(scenario), "--out", str(tmp_path)), expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--generate", "poisson", "--policy", "nope"), "unknown policy 'nope'"),
        (("--generate", "poisson", "--seed", "-1"), "--seed must be >= 0"),
        ((), "give exactly one of --trace FILE or --generate SPEC"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    assert_refused(simulate(*args, "--out", str(tmp_path)), expected)


@pytest.mark.parametrize("cluster", ["h100-pcie5:0", "l4:0,a6000-pcie4:0"])
def test_a_cluster_without_nodes_is_refused_before_any_planning(
    tmp_path: Path, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner cannot plan for no node; the command says so instead of calling it."""

    def no_planning(*args: object, **kwargs: object) -> None:
        raise AssertionError("the planner ran on a cluster with no nodes")

    monkeypatch.setattr(policies, "plan", no_planning)
    result = simulate(
        "--generate", "poisson:models=1,duration=10", "--cluster", cluster, "--out", str(tmp_path)
    )
    assert_refused(result, "the cluster has no nodes")


def test_every_policy_reports_nothing_served_when_every_node_is_cordoned(tmp_path: Path) -> None:
    """A drained cluster is a real state, not bad input: every policy (uniform-offload crashed on it)
    runs, serves nothing and drops what waits past the queue timeout, and a warning says why."""
    cluster = tmp_path / "cordoned.yaml"
    cluster.write_text("cluster:\n  - {preset: l4, count: 2, cordoned: true}\n")
    out = tmp_path / "out"
    result = simulate(
        "--generate", "poisson:models=2,rate=1,duration=60", "--cluster", str(cluster), "--out", str(out)
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "warning: no node accepts work" in result.stderr
    reports = json.loads((out / "report.json").read_text())["scenarios"]["generated-poisson"]
    assert sorted(r["policy"] for r in reports) == sorted(policies.POLICIES)
    for report in reports:
        assert report["requests"] > 0 and report["dropped"] > 0, report
        assert report["completed"] == 0 and report["goodput_tokens_per_second"] == 0.0, report


def test_a_scenario_file_keeps_its_own_seed_unless_seed_is_given(tmp_path: Path) -> None:
    """--seed used to default to 0 and overwrite the file's ``seed: 3``."""
    scenario_path = tmp_path / "small.yaml"
    scenario_path.write_text(SMALL_SCENARIO)
    own = load_scenario(scenario_path)
    assert own.seed == 3 and own.models[0].min_decode_tokens_per_second == 5.0  # `slo:` read
    for seed_args, seed in (((), 3), (("--seed", "7"), 7)):
        out = tmp_path / f"out{seed}"
        result = simulate(
            "--generate", str(scenario_path), "--policy", "binpack", "--out", str(out), *seed_args
        )
        assert result.exit_code == 0, (result.output, result.exception)
        assert f"(seed {seed})" in result.output
        assert json.loads((out / "report.json").read_text())["seed"] == seed
        expected = scenario_requests(parse_generate_spec(str(scenario_path), None, seed))
        assert read_trace_csv(out / "trace.csv") == expected
    assert parse_generate_spec(str(scenario_path), None).seed == 3
    assert parse_generate_spec("poisson:models=1", None).seed == 0


def test_a_trace_name_that_names_no_family_is_refused_not_mapped(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(CSV_HEADER + "1,team/chat-assistant,100,10\n")
    assert_refused(
        simulate("--trace", str(trace), "--policy", "binpack", "--out", str(tmp_path)),
        "model 'team/chat-assistant' names no known family",
    )


def test_models_file_gives_a_traces_models_priorities_and_slos(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(CSV_HEADER + "0.5,team/chat,100,10\n1.0,team/batch,100,10\n")
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - {name: team/chat, family: llama-1b, priority: 100, preemptible: false, slo: 5}\n"
        "  - {name: team/batch, family: qwen-0.5b, priority: 0}\n"
        "cluster:\n  - {preset: l4, count: 1}\n"
    )
    out = tmp_path / "out"
    result = simulate("--trace", str(trace), "--models", str(models), "--policy", "all", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "2 models on 1 nodes" in result.output
    # the ceiling, and SLO attainment per priority tier, for every policy
    assert "ceiling (offered / best baseline)" in result.output
    assert "SLO attainment" in result.output
    tier_rows = [
        line.split() for line in result.output.splitlines() if line.strip().startswith(("100 ", "0 "))
    ]
    assert [row[0] for row in tier_rows] == ["100", "0"]
    report = json.loads((out / "report.json").read_text())
    (rows,) = report["scenarios"].values()
    assert {row["policy"] for row in rows} == {
        "residency",
        "lru-evict",
        "sleep-swap",
        "uniform-offload",
        "binpack",
    }
    assert all(set(row["requests_by_priority"]) == {"100", "0"} for row in rows)
    # a trace model the file does not list is refused
    trace.write_text(CSV_HEADER + "0.5,team/other-llama-1b,100,10\n")
    assert_refused(
        simulate("--trace", str(trace), "--models", str(models), "--out", str(out)),
        "does not list: team/other-llama-1b",
    )
    assert_refused(simulate("--generate", "poisson", "--models", str(models)), "--models applies to --trace")


def test_a_scenario_trace_past_its_duration_is_refused_not_cut(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text(CSV_HEADER + "1,ns/llama-1b,100,10\n45,ns/llama-1b,100,10\n")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        SMALL_SCENARIO.replace(
            "workload: {pattern: poisson, total_rate_per_second: 1.0}\n", "trace: trace.csv\n"
        )
    )
    assert_refused(
        simulate("--generate", str(scenario), "--policy", "binpack", "--out", str(tmp_path)),
        "1 of 2 requests arrive at or after duration_seconds (30 s; the last at 45 s)",
    )
