"""benchmarks/linear_attention_forms.py on CPU: the forms agree, every length and model setting is timed,
and the crossover length follows its rule."""

import json

import pytest


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("linear_attention_forms")


def test_quick_run_times_every_length_and_model_setting(bench, tmp_path):
    bench.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "linear_attention_forms.json").read_text())
    assert [r["T"] for r in result["rows"]] == list(bench.QUICK_LENGTHS)
    # float32 on a CPU: the parallel and chunked forms differ by the order of <= 128-term sums
    assert all(r["parallel_vs_chunk_rel_diff"] <= 1e-5 for r in result["rows"])
    assert all(r[f"{form}_fwd_bwd_ms"] > 0 for r in result["rows"] for form in ("parallel", "chunk", "softmax"))
    settings = [(r["attention"], r["linear_form"]) for r in result["model"]["rows"]]
    assert settings == [("full", "-")] + [("interleaved", form) for form in bench.LINEAR_FORMS]
    assert result["crossover_len"] == bench.crossover(result["rows"])
    assert (tmp_path / "linear_attention_forms.png").is_file() and (tmp_path / "linear_attention_forms_model.png").is_file()


def row(T: int, parallel_ms: float, chunk_ms: float) -> dict:
    return {"T": T, "parallel_fwd_bwd_ms": parallel_ms, "chunk_fwd_bwd_ms": chunk_ms}


def test_crossover_is_the_longest_length_up_to_which_the_parallel_form_always_won(bench):
    # the H200's measured pattern: parallel ahead to 1,024, behind from 2,048
    rows = [row(512, 0.22, 1.15), row(2048, 1.21, 1.18), row(1024, 0.41, 1.25), row(4096, 3.7, 1.2)]
    assert bench.crossover(rows) == 1024
    assert bench.crossover([row(128, 2.0, 1.0), row(256, 0.5, 1.0)]) is None  # lost at the shortest
    assert bench.crossover([row(128, 0.5, 1.0), row(256, 0.5, 1.0)]) == 256  # won everywhere
