"""The roofline prediction (``benchmarks/roofline.py``): the properties a first GPU run is compared against.

A roofline is a floor: no provider beats three GEMMs of the full shape, and the design brief's H100 measurements all
lie above their predictions. Well under a second.
"""

from __future__ import annotations

from benchmarks import roofline


def _rows(tmp_path):
    return [r for r in roofline.main(["--out", str(tmp_path / "r.json")]) if r["case"] == "predicted"]


def test_no_provider_beats_the_three_gemm_floor_and_measurements_lie_above_the_prediction(tmp_path):
    rows = _rows(tmp_path)
    assert {r["provider"] for r in rows} >= {"bs_kernels", "bs_kernels_ce", "torch", "liger_flce", "gemm3"}
    assert {(r["gpu"], r["n"]) for r in rows} == {(g.name, n) for g in roofline.GPUS.values() for n in (8192, 32768)}
    assert all(r["vs_gemm3"] >= 1.0 and r["device"] == "predicted" and r["command"] for r in rows)
    calibrated = [r for r in rows if "design_brief_measured_ms" in r]
    assert len(calibrated) == len(roofline.CALIBRATION)
    assert all(0.5 < r["predicted_over_measured"] < 1.0 for r in calibrated)


def test_the_dw_accumulation_is_what_a_short_chunk_costs_and_bandwidth_is_what_the_h200_buys(tmp_path):
    rows = {(r["gpu"], r["n"], r["provider"]): r for r in _rows(tmp_path)}
    h100, h200 = roofline.GPUS["h100"].name, roofline.GPUS["h200"].name
    default = rows[(h100, 32768, "bs_kernels")]
    # at the default 384 rows dW += dZ^T H reads and writes the [V, D] accumulator per chunk: memory-bound on an H100
    assert default["chunk_rows"] == 384 and default["gemm_memory_bound_ms"] > 0.25 * default["ms"]
    long = rows[(h100, 32768, "bs_kernels_c1536")]
    assert long["ms"] < default["ms"] and long["gemm_memory_bound_ms"] < 1.0  # dW's inner dimension is long enough
    # the fused BS-T and plain CE move the same bytes; the recompute path adds a GEMM and a pass
    recompute = rows[(h100, 32768, "bs_kernels_recompute")]
    assert rows[(h100, 32768, "bs_kernels_ce")]["ms"] == default["ms"] < recompute["ms"]
    for provider in ("bs_kernels", "torch", "liger_flce"):  # memory-bound parts shrink with the H200's HBM
        assert rows[(h200, 32768, provider)]["ms"] < rows[(h100, 32768, provider)]["ms"]


def test_liger_chunks_as_its_source_says():
    assert roofline.liger_chunk(16384, 4096, 32000) == 2048  # the example in Liger-Kernel's own comment
    assert roofline.liger_chunk(32768, 4096, 128256) == 1024 and roofline.liger_chunk(100, 4096, 128256) == 4
