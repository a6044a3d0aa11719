"""benchmarks/iflame_vs_full.py on CPU: the long setting's figures, its batch fit and its merge into a result."""

import json
from pathlib import Path

import pytest
import torch

from meshforge.errors import InputError, MeshforgeError
from meshforge.models.iflame import IFlameConfig

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULT = BENCHMARKS / "results" / "iflame_vs_full.json"
TINY = ["--device", "cpu", "--dim", "64", "--heads", "4"]
LONG = [*TINY, "--only", "long", "--long-faces", "60", "--long-batch", "2", "--long-train-steps", "1"]
CONFIGS = {kind: IFlameConfig(dim=64, n_heads=4, attention=kind) for kind in ("interleaved", "full")}


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("iflame_vs_full")


def test_only_long_adds_its_figures_and_keeps_every_other(bench, tmp_path):
    # The committed H200 result, as if measured here (a result only takes figures of its own device).
    before = json.loads(RESULT.read_text()) | {"device": "cpu"}
    out = tmp_path / "iflame_vs_full.json"
    out.write_text(json.dumps(before))
    bench.main([*LONG, "--out", str(out)])
    after = json.loads(out.read_text())

    # Every figure stays; the long settings measured before keep theirs beside the new one.
    assert {k: after[k] for k in before if k != "long_sequences"} == {k: v for k, v in before.items() if k != "long_sequences"}
    long = after["long_sequences"]["60faces"]
    assert after["long_sequences"] == {**before.get("long_sequences", {}), "60faces": long}
    assert (long["faces"], long["batch"], long["tokens_per_step"]) == (60, 2, 2 * 9 * 61)
    assert long["batch_rule"] == "given (--long-batch)" and long["fit"] is None
    assert set(long["linear_attention_forms"].values()) == {"torch chunked"}
    for kind in ("interleaved", "full"):
        assert long[kind]["step_s"] > 0 and not long[kind]["oom"]
    assert after["train_step_time_ratio_60faces"] == pytest.approx(long["interleaved"]["step_s"] / long["full"]["step_s"])
    assert after["peak_memory_ratio_60faces"] is None  # no allocator peak off CUDA
    figures = [row["figure"] for row in bench.table_rows(after)]
    assert "train step, 48 x 800 faces (s)" in figures and "train step, 2 x 60 faces (s)" in figures
    assert out.with_suffix(".png").stat().st_size > 0


def test_the_4000_face_setting_has_the_4k_keys(bench):
    summary = {}
    long = {"faces": 4000, "interleaved": {"step_s": 2.0, "peak_bytes": 30}, "full": {"step_s": 4.0, "peak_bytes": 40}}
    bench.add_long(summary, long)
    assert summary == {"train_step_time_ratio_4k": 0.5, "peak_memory_ratio_4k": 0.75, "long_sequences": {"4k": long}}


def test_every_level_of_a_4000_face_mesh_runs_fla_chunked_on_cuda(bench):
    cuda = torch.device("cuda")  # a device object only: nothing runs
    assert set(bench.linear_forms(cuda, 9 * 4001).values()) == {"fla chunked"}
    # At 800 faces the face level (801 positions) is within PARALLEL_MAX_LEN.
    assert bench.linear_forms(cuda, 9 * 801) == {"tokens": "fla chunked", "vertices": "fla chunked",
                                                 "faces": "fused parallel"}  # fmt: skip


def test_only_long_refuses_a_result_of_another_device(bench, tmp_path):
    out = tmp_path / "iflame_vs_full.json"
    out.write_text(json.dumps({"benchmark": "iflame_vs_full", "device": "NVIDIA H200"}))
    with pytest.raises(InputError, match="measured on NVIDIA H200, this run is on cpu"):
        bench.main([*LONG, "--out", str(out)])


def test_off_cuda_the_long_batch_must_be_given(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--only", "long", "--out", str(tmp_path / "x.json")])


def test_the_fitted_batch_is_the_largest_whose_peak_line_stays_in_the_budget(bench):
    # Peaks 10 GB at one sequence and 14 at two: 6 GB of model and optimiser, 4 GB a sequence.
    gb = 10**9
    batch = bench.batch_that_fits(10 * gb, 14 * gb, 33 * gb)
    assert batch == 6 and 6 * gb + batch * 4 * gb <= 33 * gb < 6 * gb + (batch + 1) * 4 * gb
    assert bench.batch_that_fits(10 * gb, 14 * gb, 9 * gb) == 1
    with pytest.raises(MeshforgeError, match="added no memory"):
        bench.batch_that_fits(10 * gb, 10 * gb, 33 * gb)


def test_the_long_batch_is_the_largest_both_models_fit(bench, monkeypatch):
    gb = 10**9
    per_sequence = {"full": 4 * gb, "interleaved": 5 * gb}  # beside 6 GB of model and optimiser each

    def fake_step(cfg, device, batch, faces, steps, warmup):
        return {"step_s": 1.0, "peak_bytes": 6 * gb + batch * per_sequence[cfg.attention], "oom": False}

    monkeypatch.setattr(bench, "train_step", fake_step)
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench.torch.cuda, "mem_get_info", lambda device: (40 * gb, 141 * gb))
    batch, fit = bench.fit_batch(CONFIGS, bench.resolve_device("cpu"), 60)
    # A budget of 36 GB: the baseline fits 7 sequences, the interleaved model 6.
    assert (fit["budget_bytes"], fit["full"]["batch"], fit["interleaved"]["batch"], batch) == (36 * gb, 7, 6, 6)


def test_the_long_batch_is_halved_until_both_models_fit(bench, monkeypatch):
    fits = {"full": 5, "interleaved": 3}  # largest batch each fits in
    calls = []

    def fake_step(cfg, device, batch, faces, steps, warmup):
        calls.append((cfg.attention, batch))
        oom = batch > fits[cfg.attention]
        return {"step_s": None if oom else 1.0, "peak_bytes": None, "peak_gb": None, "oom": oom}

    monkeypatch.setattr(bench, "train_step", fake_step)
    long = bench.long_train(CONFIGS, bench.resolve_device("cpu"), 60, 8, 1)
    # 8: the baseline runs out of memory; 4: the baseline fits, the interleaved model does not; 2: both fit.
    assert calls == [("full", 8), ("full", 4), ("interleaved", 4), ("full", 2), ("interleaved", 2)]
    assert long["batch"] == 2 and long["batch_rule"].endswith("out of memory at [8, 4]")

    fits["full"] = 0
    with pytest.raises(MeshforgeError, match="one sequence of 60 faces runs out of GPU memory"):
        bench.long_train(CONFIGS, bench.resolve_device("cpu"), 60, 2, 1)


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """Tiny train-iflame runs of both attention kinds: a pair of the same 3 steps, and a pair stopped by
    the same (tiny) time limit, each evaluated on its whole val split."""
    from meshforge_plugins.cli import main as cli

    from meshforge.data.synth import generate
    from meshforge.data.tokenize import TokenizeConfig, tokenize_folder

    root = tmp_path_factory.mktemp("parity")
    generate(root / "synth", n=12, seed=0, max_faces=60, families=["table", "bench"])
    tokenize_folder(TokenizeConfig(input=root / "synth", out=root / "tokens", max_faces=60, val_fraction=0.25, workers=1))
    tiny = ["--set", "model.dim=32", "--set", "model.n_heads=2", "--set", "model.blocks=[1,1,2,1,1]",
            "--set", "model.max_seq_len=189", "--max-faces", "20", "--eval-meshes", "0", "--eval-every", "0",
            "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1"]
    runs = {}
    for pair, budget in (("steps", ["--steps", "3"]), ("time", ["--steps", "10000", "--time-limit-min", "0.002"])):
        for kind in ("interleaved", "full"):
            out = root / f"{pair}-{kind}"
            args = ["--device", "cpu", "train-iflame", "--data", str(root / "tokens"), "--out", str(out), *budget, *tiny]
            assert cli([*args, "--set", f"model.attention={kind}"]) == 0
            runs[pair, kind] = out
    return runs


def test_rescore_takes_the_step_matched_and_the_equal_time_pairs(bench, parity_runs, tmp_path):
    out = tmp_path / "iflame_vs_full.json"
    out.write_text(json.dumps(json.loads(RESULT.read_text()) | {"device": "cpu"}))
    steps = [parity_runs["steps", k] for k in ("interleaved", "full")]
    timed = [parity_runs["time", k] for k in ("interleaved", "full")]
    bench.main(["--rescore-face-acc", "--runs", *map(str, steps), "--time-runs", *map(str, timed), "--out", str(out)])
    after = json.loads(out.read_text())

    summaries = {run: json.loads((run / "summary.json").read_text()) for run in steps + timed}
    acc = {kind: summaries[run]["val_face_acc"] for kind, run in zip(("interleaved", "full"), steps)}
    assert after["face_acc"] == acc and after["face_acc_runs"]["steps"] == 3
    assert after["face_acc_delta_pt"] == pytest.approx(100 * (acc["interleaved"] - acc["full"]))
    equal_time = after["face_acc_equal_time"]
    reached = {kind: summaries[run]["last_step"] for kind, run in zip(("interleaved", "full"), timed)}
    assert equal_time["runs"]["time_limit_min"] == 0.002 and equal_time["runs"]["steps"] == reached
    assert equal_time["face_acc"] == {kind: summaries[run]["val_face_acc"] for kind, run in zip(("interleaved", "full"), timed)}
    assert set(equal_time["samples_per_s_median"]) == {"interleaved", "full"}
    assert all(rate > 0 for rate in equal_time["samples_per_s_median"].values())
    figures = [row["figure"] for row in bench.table_rows(after)]
    assert "val face-acc, 3 steps each" in figures
    assert f"val face-acc, 0.002 min each ({reached['interleaved']} / {reached['full']} steps)" in figures


def test_a_pair_must_match_the_comparison_it_is_given_as(bench, parity_runs):
    finished = [parity_runs["steps", k] for k in ("interleaved", "full")]
    with pytest.raises(MeshforgeError, match="needs a run stopped by its time limit"):
        bench.equal_time_figures(finished)
    mixed = {"interleaved": parity_runs["steps", "interleaved"], "full": parity_runs["time", "full"]}
    with pytest.raises(MeshforgeError, match="needs a finished run"):
        bench.face_acc(mixed)


COMPANIONS = ["iflame_step_variants.json", "first_step.json", "linear_attention_forms.json", "iflame_vs_full_decode.json"]


def test_collect_copies_the_companion_benchmarks_figures_in(bench, tmp_path):
    for name in ["iflame_vs_full.json", *COMPANIONS]:
        (tmp_path / name).write_text((RESULT.parent / name).read_text())
    out = tmp_path / "iflame_vs_full.json"
    # A later decoding run without batch 64, collected into a result that holds batch-64 figures of an older one.
    stale = json.loads(out.read_text())
    decode_path = tmp_path / "iflame_vs_full_decode.json"
    decode = json.loads(decode_path.read_text())
    stale["decode_throughput_ratio_b64"] = decode.pop("decode_throughput_ratio_b64", 3.0)
    for kind in ("interleaved", "full"):
        for key in ("decode_b64", "decode_eager_b64"):
            stale[kind][key] = decode[kind].pop(key, {"tokens_per_s": 1.0})
    decode["settings"]["decode_batches"] = [b for b in decode["settings"]["decode_batches"] if b != 64]
    out.write_text(json.dumps(stale))
    decode_path.write_text(json.dumps(decode))
    bench.main(["--collect", "--out", str(out)])
    after = json.loads(out.read_text())
    variants, first, forms, decode = (json.loads((tmp_path / n).read_text()) for n in COMPANIONS)

    interleaved = [r for r in variants["rows"] if r["attention"] == "interleaved" and not r["operators_free"]]
    fastest = min(interleaved, key=lambda r: r["step_s"])
    same = next(r for r in variants["rows"] if r["attention"] == "full" and not r["operators_free"]
                and (r["grad_checkpoint"], r["compiled"]) == (fastest["grad_checkpoint"], fastest["compiled"]))
    assert after["train_step_fastest"]["interleaved"]["step_s"] == fastest["step_s"]
    assert after["train_step_time_ratio_fastest"] == fastest["step_s"] / same["step_s"]
    recorded = next(r for r in first["rows"] if r["fla_configs"] == "recorded")
    assert after["first_step"]["interleaved_recorded_configs_s"] == recorded["first_step_s"]
    assert after["short_sequences"]["crossover_len"] == forms["crossover_len"]
    # Decoding comes whole from the later --only decode run: no batch it did not time is left behind.
    assert after["decode_throughput_ratio_b16"] == decode["decode_throughput_ratio_b16"]
    assert "decode_throughput_ratio_b64" not in after and "decode_b64" not in after["interleaved"]
    assert after["interleaved"]["train"] == json.loads(RESULT.read_text())["interleaved"]["train"]
    bench.main(["--collect", "--out", str(out)])  # collecting again changes nothing
    assert json.loads(out.read_text()) == after


def test_collect_refuses_a_companion_of_another_device(bench, tmp_path):
    (tmp_path / "iflame_vs_full.json").write_text(RESULT.read_text())
    other = json.loads((RESULT.parent / "first_step.json").read_text()) | {"device": "cpu"}
    (tmp_path / "first_step.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="first_step.json.*measured on cpu"):
        bench.main(["--collect", "--out", str(tmp_path / "iflame_vs_full.json")])


def test_collect_takes_the_short_throughput_runs_of_its_device(bench, parity_runs, tmp_path):
    import shutil

    out = tmp_path / "iflame_vs_full.json"
    out.write_text(json.dumps(json.loads(RESULT.read_text()) | {"device": "cpu"}))
    for kind in ("interleaved", "full"):  # an eager pair only: the compiled row stays out
        shutil.copytree(parity_runs["steps", kind], tmp_path / bench.SHORT_RUNS / f"{kind}-eager")
    bench.main(["--collect", "--out", str(out)])
    eager = json.loads(out.read_text())["short_throughput"]["eager"]
    rates = {kind: bench.median_samples_per_s(parity_runs["steps", kind]) for kind in ("interleaved", "full")}
    walls = {kind: json.loads((parity_runs["steps", kind] / "summary.json").read_text())["wall_time_s"]
             for kind in ("interleaved", "full")}
    assert eager == {"samples_per_s_median": rates, "ratio": rates["interleaved"] / rates["full"], "steps": 3,
                     "wall_time_s": walls}
    assert "compiled" not in json.loads(out.read_text())["short_throughput"]
    figures = [r["figure"] for r in bench.table_rows(json.loads(out.read_text()))]
    assert "train-iflame samples/s, synth data, eager (median, 3 steps)" in figures
    assert "train-iflame wall time, synth data, eager, 3 steps (s)" in figures

    out.write_text(json.dumps(json.loads(out.read_text()) | {"device": "NVIDIA H200"}))
    with pytest.raises(InputError, match="interleaved-eager/summary.json.*measured on cpu, not on NVIDIA H200"):
        bench.main(["--collect", "--out", str(out)])
