"""benchmarks/sft_anchor.py still runs: splice's default SFT job and TRL SFTTrainer + PEFT on a tiny
random Llama with SmolLM2's tokenizer, each in its own worker, both adapters scored by splice's
held-out scorer. The scores of a tiny run mean nothing: this checks both runs are there with the same
schedule, a per-token mean loss, answer-only labels, and that the table and verdict are written;
it compares no timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sft_anchor_runs_tiny(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sft_anchor.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, env=subprocess_env(),
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads((out / "sft_anchor.json").read_text())
    assert result["tiny"] and result["held_out"] == 4
    vocab = 49152  # SmolLM2's tokenizer: a near-uniform random model's loss is about log(vocab)
    firsts = []
    for framework in ("splice", "trl"):
        steps = result["runs"][framework]["steps"]
        assert [s["step"] for s in steps] == [1, 2]
        # splice's schedule in both: 3 warm-up steps from lr / 3 (Hugging Face's would start at 0)
        assert [s["lr"] for s in steps] == pytest.approx([1e-3 / 3, 2e-3 / 3])
        assert all(1000 < s["tokens"] <= 4 * 352 for s in steps)  # 4 packed rows of at most 352 tokens
        firsts.append(steps[0]["loss"])
        assert set(result["scores"][framework]) == {"json_valid", "exact_match", "word_f1"}
        assert all(0.0 <= v <= 1.0 for v in result["scores"][framework].values())
        assert Path(result["runs"][framework]["adapter"], "adapter_config.json").is_file()
    assert firsts == pytest.approx([math.log(vocab)] * 2, abs=0.1)  # a mean per target token, not a sum
    # Both train on the answer only; TRL also on the newline after the end-of-turn token.
    splice_text, trl_text = (result["runs"][f]["trained_text_of_row_0"] for f in ("splice", "trl"))
    assert splice_text.startswith('{"name": "') and splice_text.endswith('"}<|im_end|>')
    assert trl_text.startswith('{"name": "') and trl_text.endswith('"}<|im_end|>\n')
    table = (out / "sft_anchor.md").read_text()
    assert "| splice (default job) |" in table and "| TRL SFTTrainer + PEFT |" in table
    assert "points: within the issue's bar" in table or "points: NOT within the issue's bar" in table
