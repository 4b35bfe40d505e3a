"""`make bench`'s code on tiny sizes (`--quick`): the harness, embed_score against the seed's way, the memory probe
and the GPU script's dry run on CPU. The figures mean nothing at these sizes; only that the code runs and the scores
agree. Generation runs the embedded LLM: a slow test. The re-runs benchmark's timer and figure are checked by the
end-to-end test (tests/d2e/test_local_run.py), whose two runs are what that benchmark measures."""

import json
import math
import re

import pytest

from benchmarks import bench, gpu_embed
from benchmarks.speed import BENCHMARKS, Row, benchmark, load


def test_every_benchmark_of_the_issue_is_registered():
    issue = {"embed_score_cpu", "memory", "embedded_generation", "reruns", "api_generation", "stage_times"}
    assert issue <= set(load())


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
    # The torch stage at one and three queries per chunk, and the two CPU backends at one.
    assert [row.name.rsplit(", ", 1)[-1] for row in results["embed_score_cpu"]] == [
        "1 per chunk", "onnx", "openvino", "3 per chunk"]
    for row in results["embed_score_cpu"]:
        assert row.unit == "rows/s" and row.ours > 0 and row.baseline > 0
        found = re.search(r"max abs score difference (\S+) \((\w+), tolerance (\S+): ok\)", row.note)
        assert found, row.note
        difference, precision, tolerance = float(found.group(1)), found.group(2), float(found.group(3))
        # fp32 backends stay within 1e-4 of the seed's fp32 scores; bf16 (OpenVINO on CPUs that have it) 1e-2.
        assert difference <= tolerance == (1e-2 if precision == "bfloat16" else 1e-4), row.note
    assert [row.unit for row in results["memory"]] == ["MB", "MB"]
    assert all(row.ours > 0 and row.baseline > 0 for row in results["memory"])
    assert "<!-- bench:memory -->" in (tmp_path / "b.md").read_text()


def test_the_gpu_script_runs_on_cpu_in_a_dry_run(capsys, tmp_path):
    assert gpu_embed.main(["--dry-run", "--stage-rows", "12", "--json", str(tmp_path / "gpu.json")]) == 0
    printed = capsys.readouterr().out
    assert "| seed-style fp32, batch 32 |" in printed
    assert "| stage, fp32 (CPU), batch 4 |" in printed and "| stage, fp32 (CPU), batch 8 |" in printed
    assert "Whole embed_score stage on cpu: 12 rows" in printed
    measured = json.loads((tmp_path / "gpu.json").read_text())
    assert [path["batch_size"] for path in measured["paths"]] == [32, 4, 8]
    # The same weights in fp32 on the CPU: the stage's cosines and scores are the baseline's.
    assert all(path["cosine_difference"] < 1e-5 for path in measured["paths"])
    assert measured["stage"]["rows"] == 12 and measured["stage"]["largest_score_difference"] < 1e-5


def test_padding_is_counted_in_each_paths_order():
    texts = ["aaaa", "b", "cc", "ddd"]
    lengths = [10, 40, 20, 30]  # token counts need not follow character counts
    # The seed's order is by characters: (aaaa, ddd) and (cc, b) pad to 30 and 40.
    assert gpu_embed.padded_tokens(lengths, 2, gpu_embed.seed_order(texts)) == 2 * 30 + 2 * 40
    # The stage's is by tokens: (b, ddd) and (cc, aaaa) pad to 40 and 20.
    assert gpu_embed.padded_tokens(lengths, 2, gpu_embed.stage_order(lengths)) == 2 * 40 + 2 * 20



def test_peaks_are_found_by_device_name():
    assert gpu_embed.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_embed.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_embed.peak_tflops("NVIDIA L40S") == 362.0 and gpu_embed.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_embed.peak_tflops("Some other card") is None
    assert math.isclose(gpu_embed.flops_per_text(1, gpu_embed.TINY), 2 * (2 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 32))


@pytest.mark.slow
def test_embedded_generation_on_tiny_sizes():
    rows = bench.run(["embedded_generation"], quick=True, output=None)["embedded_generation"]
    assert rows and all(row.ours > 0 for row in rows), rows


@pytest.mark.slow
def test_api_generation_measures_concurrency_against_a_real_server(tmp_path, monkeypatch):
    from benchmarks.speed import api_generation

    monkeypatch.setattr(api_generation, "CONCURRENCIES", (1, 8))
    monkeypatch.setattr(api_generation, "LATENCY", 0.2)
    rows = api_generation.concurrency_rows(tmp_path, quick=True)
    serial, parallel = rows
    assert serial["ratio"] == 1.0 and serial["unit"] == "rows/s"
    # 8 requests in flight against a server that waits 0.2 s a request: several times the serial rate.
    assert parallel["ratio"] > 2.5, parallel
    assert "most requests in flight at the server: 8" in parallel["note"]


def test_stage_times_split_each_stage_into_a_fixed_part_and_a_part_per_chunk():
    from benchmarks.speed import stage_times

    # generate: 2 s fixed + 3 s a chunk; embed: 6 s fixed + 0.1 s a chunk; a noisy stage that got faster: no slope.
    small = {"tasks": {"generate": 2 + 3 * 10, "embed": 6 + 0.1 * 10, "report": 1.2}, "seconds": 50.0,
             "before_tasks": 1.5, "after_tasks": 0.5}
    large = {"tasks": {"generate": 2 + 3 * 40, "embed": 6 + 0.1 * 40, "report": 1.0}, "seconds": 140.0,
             "before_tasks": 1.5, "after_tasks": 0.5}
    fitted = stage_times.fit(small, large, 10, 40)
    assert fitted["generate"]["per_chunk"] == pytest.approx(3.0) and fitted["generate"]["fixed"] == pytest.approx(2.0)
    assert fitted["generate"]["per_thousand"] == pytest.approx(3002.0)
    assert fitted["embed"]["per_thousand"] == pytest.approx(106.0)
    assert fitted["embed"]["fixed_share"] == pytest.approx(6 / 106)
    assert fitted["report"] == {"per_chunk": 0.0, "fixed": 1.2, "per_thousand": 1.2, "fixed_share": 1.0}
    rows = stage_times.stage_rows(fitted, small, large, (10, 40), floor=5.0)
    assert [row.name.split(",")[1].split(":")[0].strip() for row in rows] == ["generate", "embed", "report",
                                                                              "all stages"]
    total = rows[-1]
    assert total.ours == pytest.approx(3002 + 106 + 1.2 + 2.0)
    assert "pipeline overhead" in total.note and f"{(2 + 6 + 1.2 + 2) / total.ours:.1%}" in total.note


def test_llama_batching_decodes_several_sequences_with_the_embedded_model():
    rows = bench.run(["llama_batching"], quick=True, output=None)["llama_batching"]
    assert [row.name for row in rows] == ["llama.cpp generation, 2 sequences at once vs 1",
                                          "llama.cpp prompt processing, 2 sequences vs 1"]
    assert all(row.ours > 0 and row.baseline > 0 and row.ratio > 0 for row in rows), rows
