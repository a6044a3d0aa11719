"""benchmarks/decode_linear.py's CPU smoke test (named apart from tests/kernels/test_decode_linear.py: one module name per basename): every projection timed in every form, the GEMV grid at
batch 1 only, the best tiling the fastest of the grid, the table written."""

import json


def test_the_cpu_run_times_every_form_of_every_projection(benchmark_script, tmp_path):
    bench = benchmark_script("decode_linear")
    bench.main(["--device", "cpu", "--tiny", "--batches", "1", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode_linear.json").read_text())
    assert result["benchmark"] == "decode_linear" and result["device"].startswith("cpu") and result["tiny"]
    rows = result["rows"]
    assert [(r["batch"], r["projection"]) for r in rows] == [
        (b, name) for b in (1, 2) for name, *_ in bench.TINY_PROJECTIONS
    ]
    for row in rows:
        # the interpreter runs every tiling: a failure here is the kernel's, not the compiler's
        assert all(isinstance(row[key], float) and row[key] > 0 for key in ("reference_us", "dot16_us"))
        assert row["default"]["us"] > 0 and not row["default"]["dot"]  # 1-2 rows: the GEMV form
        if row["batch"] == 1:
            times = [t["us"] for t in row["gemv_grid"]]
            assert len(times) == 4 and row["best_gemv"]["us"] == min(times)
        else:
            assert "gemv_grid" not in row
    assert (tmp_path / "decode_linear.png").stat().st_size > 0


def test_a_tiling_that_fails_is_recorded_and_shown_as_failed(benchmark_script):
    bench = benchmark_script("decode_linear")

    def refuse(launches):
        raise RuntimeError("out of resources: shared memory\nmore")

    assert bench.time_form(refuse, None, [], {}, None) == "RuntimeError: out of resources: shared memory"
    row = {"batch": 1, "projection": "qkv", "k": 512, "n": 1536, "reference_us": 8.0, "dot16_us": "RuntimeError: x",
           "default": {"dot": False, "block_m": 1, "block_n": 4, "block_k": 512, "num_warps": 4, "us": 2.5}}
    (entry,) = bench.table_rows([row])
    assert entry["dot16 us"] == "failed" and entry["default us"] == 2.5 and entry["default tiling"] == "1x4x512 w4"
