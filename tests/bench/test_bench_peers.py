"""bench.bench_peers without the peer venvs: the JSON parsing, the figures, the section writer, and
the peer scripts' refusals when their inputs are missing. The real run needs `.venv-inc` and
`.venv-peers` (`make bench-peers`); nothing here starts INC or llm-compressor."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench_peers as bp
from bench import run_all

ROOT = Path(__file__).resolve().parents[2]


def fake_result(tool: str, heldout: Path, **over: object) -> dict:
    r = {"tool": tool, "tool_version": f"{tool} 1.0", "torch": "2.13.0+cpu", "transformers": "5.25.0", "threads": 1,
         "batch": 2, "calib_shape": [4, 128], "heldout_shape": [2, 128], "n_batches": 2, "model_bytes": 10**8,
         "quant_weight_bytes": 8 * 10**7, "quant_weight_numel": 4 * 10**7, "n_selected": 210, "n_quantized": 210,
         "observe_s": [1.2, 1.1, 1.3, 1.1], "observe_plain_s": [1.0, 1.05, 1.1, 1.2], "finalize_s": 0.1,
         "convert_s": [0.9, 0.5, 0.4], "clone_s": [0.1, 0.08], "copy_s": [0.05, 0.04, 0.06], "qdq_s": [2.0, 1.5], "qdq_plain_s": [1.0, 1.2],
         "rss_imports_bytes": 3 * 10**8, "peak_rss_bytes": 5 * 10**8, "heldout": str(heldout), "notes": ["n"]}
    if tool == "llmcompressor":
        r.update(oneshot_s=3.0, calib_plain_pass_s=2.0, observe_lm_head=False, export="/nowhere")
    r.update(over)
    return r


def test_parse_result_takes_the_last_json_line() -> None:
    line = json.dumps(fake_result("inc", Path("h")))
    r = bp.parse_result(f"INFO loading\n{{not json at all\n{line}\n")
    assert r["tool"] == "inc" and r["convert_s"] == [0.9, 0.5, 0.4]
    with pytest.raises(bp.ResultError, match="no JSON result line.*the end"):
        bp.parse_result("some log\nthe end\n")
    with pytest.raises(bp.ResultError, match="lacks peak_rss_bytes"):
        bp.parse_result(json.dumps({k: v for k, v in fake_result("ours", Path("h")).items() if k != "peak_rss_bytes"}))
    llmc = fake_result("llmcompressor", Path("h"))
    del llmc["oneshot_s"]
    with pytest.raises(bp.ResultError, match="oneshot_s"):
        bp.parse_result(json.dumps(llmc))


def test_accuracy_from_a_heldout_summary() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    acc = bp.accuracy({"plain_logprob": logp, "quant_logprob": logp - math.log(2),
                       "plain_argmax": torch.tensor([[1, 2, 3]]), "quant_argmax": torch.tensor([[1, 2, 4]])})
    assert acc.ppl_plain == pytest.approx(math.sqrt(8))  # exp(mean(-log 0.5, -log 0.25))
    assert acc.delta == pytest.approx(1.0) and acc.top1 == pytest.approx(2 / 3)


def test_figures_are_ratios_of_same_process_quantities(tmp_path: Path) -> None:
    r = fake_result("inc", tmp_path)
    assert bp.observer_cell(r).startswith("**1.100**")  # min 1.1 / min 1.0
    # forwards of the first pass 2.3 + finalize 0.1 + cold convert 0.9 over plain 2.05
    assert bp.calibration_cell(r).startswith(f"**{3.3 / 2.05:.2f}**")
    # 1.5 x 80 MB in 0.4 s against the DRAM copy: 2 x 300 MB in 0.04 s (the clone shown beside it)
    assert bp.convert_cell(r).startswith(f"**{(1.2e8 / 0.4) / (6e8 / 0.04):.3f}**")
    assert "clone 2.00 GB/s" in bp.convert_cell(r)
    assert bp.cold_cell(r).startswith("**2.25**") and bp.qdq_cell(r).startswith("**1.50**")
    assert bp.rss_cell(r).startswith("**5.00**")
    llmc = fake_result("llmcompressor", tmp_path)
    assert bp.calibration_cell(llmc).startswith(f"**{3.9 / 2.0:.2f}**") and "oneshot" in bp.calibration_cell(llmc)
    assert "lm_head skipped" in bp.observer_cell(llmc)


def _summary_file(path: Path) -> Path:
    from safetensors.torch import save_file

    logp = torch.full((2, 127), -3.0)
    top = torch.zeros((2, 128), dtype=torch.int64)
    save_file({"plain_logprob": logp, "plain_argmax": top, "quant_logprob": logp - 0.01, "quant_argmax": top.clone()},
              str(path))
    return path


def test_section_table_and_markers(tmp_path: Path) -> None:
    summary = _summary_file(tmp_path / "h.safetensors")
    runs = [bp.ToolRun("inc", result=fake_result("inc", summary)),
            bp.ToolRun("llmcompressor", missing="no interpreter at /x (`make bench-peers` builds the venv)"),
            bp.ToolRun("ours", result=fake_result("ours", summary))]
    for r in runs:
        if r.result is not None:
            bp.evaluate(r, None, 2)
    text = bp.section(runs, ["--calib-rows", "4"], 4, 2, 128, date="2026-01-01 00:00 UTC")
    lines = text.splitlines()
    assert lines[0] == bp.BEGIN and lines[-1] == bp.END and bp.TITLE in lines
    assert "| figure | INC | llm-compressor | us |" in lines
    assert "Development-sized run" in text and "`python -m bench.bench_peers --calib-rows 4`" in text
    ppl_row = next(line for line in lines if line.startswith("| held-out ppl vs bf16 |"))
    assert ppl_row.count("+1.01 %") == 2 and "not run" in ppl_row
    assert "- llm-compressor: not run: no interpreter at /x" in text
    assert any(line.startswith("- CPU: ") and "flags:" in line for line in lines)
    assert all(line.count("|") == 5 for line in lines if line.startswith("| "))  # 4 columns everywhere
    full = bp.section(runs, [], 32, 51, 128)
    assert "Development-sized run" not in full


def test_replace_section_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    first = f"{bp.BEGIN}\n{bp.TITLE}\none\n{bp.END}\n"
    second = f"{bp.BEGIN}\n{bp.TITLE}\ntwo\n{bp.END}\n"
    text = bp.replace_section("# Results\n\nbody\n", first)
    assert text == "# Results\n\nbody\n\n" + first
    again = bp.replace_section(text + "\n## Later\n", second)
    assert again == "# Results\n\nbody\n\n" + second + "\n## Later\n"
    assert bp.extract_section(again) == second and bp.extract_section("nothing") is None
    # bench.run_all rewrites RESULTS.md but keeps the section.
    target = tmp_path / "RESULTS.md"
    target.write_text(again)
    run_all.write_results(target, "# New results\n")
    assert target.read_text() == "# New results\n\n" + second
    run_all.write_results(tmp_path / "fresh.md", "# Only\n")
    assert (tmp_path / "fresh.md").read_text() == "# Only\n"


def test_scales_comparison(tmp_path: Path) -> None:
    node = {"inputs": [0.015625], "outputs": [0.00048828125], "params": {"weight": 0.03125}}
    (tmp_path / "inc.json").write_text(json.dumps({"Mode": "QUANTIZE", "Nodes": {"a": node, "b": node, "c": node}}))
    other = {**node, "params": {"weight": 0.0625}}
    (tmp_path / "ours.json").write_text(json.dumps({"Nodes": {"a": node, "b": other}}))
    assert bp.compare_scales(tmp_path / "inc.json", tmp_path / "ours.json") == (1, 3, ["b", "c"])
    runs = [bp.ToolRun("inc", result={"scales": str(tmp_path / "inc.json")}),
            bp.ToolRun("ours", result={"scales": str(tmp_path / "inc.json")})]
    assert "for 3 of 3 Linears; their ppl/top-1 differ" in bp.scales_line(runs)
    assert bp.scales_line(runs[:1]) is None


def test_missing_peer_interpreter_is_a_column_not_a_crash(tmp_path: Path) -> None:
    opts = bp.argparse.Namespace(batch=2, threads=1, passes=1, convert_repeats=1, qdq_repeats=1)
    run = bp.run_tool("inc", str(tmp_path / "no-venv" / "python"), tmp_path, tmp_path / "t", tmp_path, opts)
    assert run.result is None and "make bench-peers" in run.missing


@pytest.mark.parametrize("script", ["bench/peer_inc.py", "bench/peer_llmcompressor.py", "-m bench.side_ours"])
def test_scripts_refuse_missing_inputs_clearly(tmp_path: Path, script: str) -> None:
    """Each exits with a message naming what is missing, before importing its tool."""
    command = [sys.executable, *script.split()]
    ckpt = tmp_path / "ckpt"
    no_ckpt = subprocess.run(command + ["--model", str(ckpt), "--tokens", str(tmp_path / "t.safetensors"),
                                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert no_ckpt.returncode != 0 and f"no HF checkpoint at {ckpt}" in no_ckpt.stderr
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    no_tokens = subprocess.run(command + ["--model", str(ckpt), "--tokens", str(tmp_path / "t.safetensors"),
                                          "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert no_tokens.returncode != 0 and f"token file {tmp_path / 't.safetensors'} not found" in no_tokens.stderr
