"""report.py: sections in, report.md + valid PNGs out; missing stages say "not run"."""

import json
import os

import pytest

from reasoning import report


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_lists_stages_and_plots(tmp_path):
    base = str(tmp_path)
    report.log_stage("base_train", config={"depth": 2}, metrics={"val_bpb": 1.5, "initial_val_bpb": 3.0},
                     series={"val_bpb": [[0, 3.0], [10, 2.0], [20, 1.5]]}, seconds=60.0, base_dir=base)
    report.log_stage("chat_eval_rl", metrics={"accuracy": 0.4},
                     tables={"accuracy by level": [{"level": 1, "accuracy": 0.5, "n": 2},
                                                   {"level": 2, "accuracy": 0.25, "n": 4}]},
                     seconds=30, base_dir=base)
    path = report.generate(base)
    text = open(path).read()
    assert "| base_train | done | val_bpb=1.5000, initial_val_bpb=3.0000 | 1.0 min |" in text
    assert "| chat_sft | not run |" in text
    assert "Total wall time of recorded stages:** 1.5 min" in text
    pngs = [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".png")]
    assert "base_train.png" in pngs and any("level" in p for p in pngs)
    for p in pngs:
        assert _is_png(os.path.join(os.path.dirname(path), p))
        assert f"]({p})" in text


def test_rerun_replaces_section_and_bad_values_stay_json(tmp_path):
    base = str(tmp_path)
    report.log_stage("chat_sft", metrics={"train_loss": 2.0}, base_dir=base)
    report.log_stage("chat_sft", metrics={"train_loss": float("nan")}, base_dir=base)
    sections = report.load_sections(base)
    assert list(sections) == ["chat_sft"]
    assert sections["chat_sft"]["metrics"]["train_loss"] == "nan"
    # a damaged section file is skipped, not fatal
    with open(os.path.join(base, "report", "broken.json"), "w") as f:
        f.write("{not json")
    assert "broken" not in report.load_sections(base)
    json.loads(open(os.path.join(base, "report", "chat_sft.json")).read())
    assert not [f for f in os.listdir(os.path.join(base, "report")) if f.startswith(".")]  # no temp file left
    # a hidden file that ends in .json (a stray temp of an interrupted write) is not a section
    with open(os.path.join(base, "report", ".tmp_xyzchat_rl.json"), "w") as f:
        json.dump({"name": "chat_rl", "metrics": {"accuracy": 0.5}}, f)
    assert list(report.load_sections(base)) == ["chat_sft"]


def test_ema_is_bias_corrected_and_tracks_a_step():
    from reasoning.report import _ema

    assert _ema([3.0, 3.0, 3.0], span=9) == pytest.approx([3.0, 3.0, 3.0])  # a constant stays put from the start
    smooth = _ema([0.0] * 50 + [1.0] * 50, span=5)
    assert smooth[49] == pytest.approx(0.0) and 0.3 < smooth[50] < 0.4 and smooth[-1] == pytest.approx(1.0, abs=1e-6)


def _eval_section(base, stage, accuracy, se, n=1000):
    report.log_stage(f"chat_eval_{stage}", config={"protocol": {"task": "synthetic"}},
                     metrics={"accuracy": accuracy, "accuracy_se": se, "num_problems": n}, base_dir=base)


@pytest.mark.parametrize("answer_only", [0.0, 0.5])
def test_rl_section_says_what_the_gain_measures_with_error_bars(tmp_path, answer_only):
    base = str(tmp_path)
    report.log_stage("chat_sft", config={"task": "synthetic", "synthetic_difficulty": "twostep",
                                         "synthetic_answer_only": answer_only}, metrics={"train_loss": 1.0},
                     base_dir=base)
    _eval_section(base, "sft", 0.362, 0.0152)
    _eval_section(base, "rl", 0.542, 0.0158)
    reward = [[i, 0.2 + i / 1000] for i in range(1, 61)]
    report.log_stage("chat_rl", metrics={"accuracy": 0.5}, series={"reward": reward}, base_dir=base)
    path = report.generate(base)
    text = open(path).read()
    assert "## RL: what the gain measures" in text
    assert "greedy accuracy on the same 1000 held-out synthetic (preset twostep) test problems" in text
    assert "| after SFT | 36.2 ± 1.5 |" in text and "| after RL | 54.2 ± 1.6 |" in text
    se = (0.0152 ** 2 + 0.0158 ** 2) ** 0.5
    assert f"| +18.0 ± {se * 100:.1f} ({0.18 / se:.1f} SE) |" in text
    # the sentence names the SFT data the gain depends on
    assert ("think span again" in text) == (answer_only > 0)
    assert ("Every SFT example was fully worked" in text) == (answer_only == 0)
    assert "![RL gain](rl_gain.png)" in text and _is_png(os.path.join(base, "report", "rl_gain.png"))


def test_no_rl_section_without_both_evals(tmp_path):
    base = str(tmp_path)
    _eval_section(base, "sft", 0.362, 0.0152)
    text = open(report.generate(base)).read()
    assert "what the gain measures" not in text and not os.path.exists(os.path.join(base, "report", "rl_gain.png"))
