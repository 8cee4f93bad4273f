"""The figures draw what their legends say, from the records the stages write."""

import pytest

pytest.importorskip("matplotlib")

from nanoseek import plots  # noqa: E402


def legend_labels(monkeypatch, draw) -> list[str]:
    """The legend texts of the figure `draw()` makes, read just before it is closed."""
    seen = []
    close = plots._pyplot().close

    def keep_labels(fig):
        seen.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        close(fig)

    monkeypatch.setattr(plots._pyplot(), "close", keep_labels)
    draw()
    return seen


@pytest.mark.parametrize("k", [8, 16])
def test_grm_figure_marks_the_ablations_at_k_whatever_k(monkeypatch, tmp_path, k):
    """With ablation_k = 16 the no_principles@16 / cold_start@16 lines vanished: "@1" is in "@16"."""
    report = {"items": 10, "voting": {"1": 0.5, str(k): 0.7}, "meta": {str(k): 0.75},
              "ablations": {"no_principles@1": 0.4, f"no_principles@{k}": 0.5, "cold_start@1": 0.3,
                            f"cold_start@{k}": 0.45, "bt_scalar_rm": 0.55}}
    labels = legend_labels(monkeypatch, lambda: plots.grm_scaling_figure(report, tmp_path / "grm.png"))
    assert f"no_principles@{k}: 50.0%" in labels and f"cold_start@{k}: 45.0%" in labels
    assert "bt_scalar_rm: 55.0%" in labels and not any("@1:" in label for label in labels)


def test_r1zero_figure_cli_makes_the_out_directory(tmp_path):
    """`python -m nanoseek.plots RUN --out docs/r1zero.png` (the README's) from a directory without
    docs/ ended in a FileNotFoundError traceback from matplotlib."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "eval_pass@1": 0.1 * s, "eval_reasoning": 0.1 * s, "eval_length": 10 + s} for s in (0, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "docs" / "r1zero.png"
    assert plots.main([str(run), "--control", "0.073", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
