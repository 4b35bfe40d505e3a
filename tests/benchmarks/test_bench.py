"""`make bench`'s code on tiny sizes (`--quick`): the harness, embed_score against the seed's way, the memory probe
and the GPU script's dry run on CPU. The figures mean nothing at these sizes; only that the code runs and the scores
agree. Generation and re-runs run the embedded LLM and whole pipelines: slow tests."""

import math
import re

import pytest

from benchmarks import bench, gpu_embed
from benchmarks.speed import BENCHMARKS, Row, benchmark, load


def test_every_benchmark_of_the_issue_is_registered():
    assert {"embed_score_cpu", "memory", "embedded_generation", "reruns"} <= set(load())


def test_a_row_s_ratio_is_ours_over_the_baseline_unless_given():
    assert Row("a", 30.0, 10.0, "rows/s").ratio == 3.0
    assert Row("a", 30.0, None, "rows/s").ratio is None
    assert Row("a", 1.0, 10.0, "s", ratio=0.5).ratio == 0.5


def test_blocks_are_replaced_in_place_or_added_before_the_end_marker():
    text = f"# B\n\nprose\n\n<!-- bench:one -->\nold\n<!-- /bench:one -->\n\n{bench.END_OF_RESULTS}\n\nafter\n"
    updated = bench.update_document(text, {"one": "<!-- bench:one -->\nnew\n<!-- /bench:one -->",
                                           "two": "<!-- bench:two -->\n2\n<!-- /bench:two -->"})
    assert "old" not in updated and "new" in updated and updated.endswith("after\n")
    assert updated.index("bench:one") < updated.index("bench:two") < updated.index(bench.END_OF_RESULTS)


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "broken", lambda quick: 1 / 0)
    benchmark("fine")(lambda quick: [Row("fine rate", 2.0, 1.0, "x/s", note="n")])
    try:
        results = bench.run(["broken", "fine"], quick=True, output=tmp_path / "b.md")
    finally:
        BENCHMARKS.pop("fine")
    assert "ZeroDivisionError" in results["broken"][0].note and results["fine"][0].ratio == 2.0
    written = (tmp_path / "b.md").read_text()
    assert "| fine rate | 2 | 1 | x/s | 2.00x | n |" in written
    assert "(--quick: tiny sizes, not figures)" in written and "cores" in written


def test_embed_score_against_the_seed_and_memory_on_tiny_sizes(tmp_path):
    results = bench.run(["embed_score_cpu", "memory"], quick=True, output=tmp_path / "b.md")
    for row in results["embed_score_cpu"]:
        assert row.unit == "rows/s" and row.ours > 0 and row.baseline > 0
        difference = float(re.search(r"max abs score difference (\S+)", row.note).group(1))
        assert difference <= 1e-4
    assert [row.unit for row in results["memory"]] == ["MB", "MB"]
    assert all(row.ours > 0 and row.baseline > 0 for row in results["memory"])
    assert "<!-- bench:memory -->" in (tmp_path / "b.md").read_text()


def test_the_gpu_script_runs_on_cpu_in_a_dry_run(capsys):
    assert gpu_embed.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "| stage (fp16 on CUDA, sorted batches) |" in printed and "seed-style fp32" in printed


def test_peaks_are_found_by_device_name():
    assert gpu_embed.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_embed.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_embed.peak_tflops("NVIDIA L40S") == 362.0 and gpu_embed.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_embed.peak_tflops("Some other card") is None
    assert math.isclose(gpu_embed.flops_per_text(1, gpu_embed.TINY), 2 * (2 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["embedded_generation", "reruns"])
def test_generation_and_reruns_on_tiny_sizes(tmp_path, name):
    rows = bench.run([name], quick=True, output=None)[name]
    assert rows and all(row.ours > 0 for row in rows), rows
