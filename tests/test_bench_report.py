"""scripts/bench_report.py: the utilisation goal's verdict, and its command line's errors."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "scripts" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(gflops, around=None, **extra):
    r = {"gflops_per_s": gflops, **extra}
    if around:
        r["matmul_peaks_adjacent"] = around
    return r


def test_utilisation_met_against_both_ceilings():
    lines = load_report().utilisation_lines("lora", row(150.0, [250.0, 280.0]), peak=290.0)
    assert "54% of the highest matmul rate measured around its own runs (150.0 of 280.0" in lines[0]
    assert "52% of the run's highest (290.0)" in lines[0]
    assert lines[0].endswith("**met**")


def test_utilisation_reached_only_against_a_low_adjacent_ceiling_is_not_met():
    # The 12:41 run of session 14: LoRA's own minutes peaked at 240, the run at 294.
    lines = load_report().utilisation_lines("lora", row(121.6, [154.0, 227.0, 240.3]), peak=294.0)
    assert "51% of the highest matmul rate measured around its own runs" in lines[0]
    assert "41% of the run's highest" in lines[0]
    assert "**not met**" in lines[0] and "not counted as met" in lines[0]


def test_utilisation_of_older_results_uses_the_runs_highest():
    lines = load_report().utilisation_lines("full", row(100.0, gflops_per_step=400.0, min_s=3.0), peak=250.0)
    assert "40% of the run's highest matmul rate (100.0 of 250.0 GFLOP/s) — **not met**" in lines[0]
    assert "best case against best case: 53%" in lines[1]


def test_command_line_errors_name_the_file(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"started": "x"}')
    for path, message in ((tmp_path / "missing.json", "cannot read it"), (bad, 'no "rows" in it')):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_report.py"), str(path)],
                              capture_output=True, text=True)
        assert done.returncode == 2
        assert f"{path}: {message}" in done.stderr
        assert "Traceback" not in done.stderr


def _run(started, rows, scale=()):
    return {"started": started, "args": {"rounds": 3}, "matmul_peaks": [250.0, 260.0], "rows": rows,
            "scale": list(scale)}


def _bench_row(name, median):
    return {"row": name, "median_s": median, "min_s": median, "pairs_per_s": 2 / median, "tokens_per_s": 100.0,
            "peak_mlx_gb": 1.0, "peak_rss_gb": 1.5, "gflops_per_s": 100.0}


def test_ablation_and_scale_each_come_from_the_run_that_has_them():
    """A scale-only run added to the latest table keeps the earlier run's ablation rows, and says
    that only those come from the earlier run."""
    report = load_report()
    scale = [{"seq": 256, "batch": 2, "median_s": 3.0, "tokens_per_s": 333.0, "s_per_ktoken": 3.0, "gflops_per_s": 120.0,
              "peak_mlx_gb": 1.3}]
    latest = _run("2026-12-02 17:09", [_bench_row("mlx-dpo-lora", 3.0)], scale)
    earlier = _run("2026-12-02 10:20", [_bench_row("mlx-dpo-lora", 3.1), _bench_row("mlx-dpo-lora/plain", 18.0)],
                   scale)
    text = "\n".join(report.extra_sections(latest, earlier))
    assert "Ablation comes from a separate run (2026-12-02 10:20" in text and "Scale and" not in text
    assert "| mlx-dpo-lora/plain | 18.00 |" in text and "step time 5.81x that of `mlx-dpo-lora`" in text
    assert "| 256 | 2 | 3.00 |" in text
    both = "\n".join(report.extra_sections(_run("2026-12-02 17:09", latest["rows"]), earlier))
    assert "Scale and ablation come from a separate run" in both
    assert report.extra_sections(_run("x", latest["rows"]), None) == []


def _scale_rows(**s_per_ktoken):
    return [{"seq": int(seq[1:]), "batch": 2, "median_s": 1.0, "tokens_per_s": 1000 / v, "s_per_ktoken": v,
             "gflops_per_s": 100.0, "peak_mlx_gb": 1.0} for seq, v in s_per_ktoken.items()]


def _paired(**medians):
    return {"started": "2026-12-03 07:27", "command": "scripts/bench_scale_paired.py --cycles 8", "base": 256,
            "lengths": {"256": {"median_s_per_ktoken": 4.0},
                        **{seq[1:]: {"median_ratio": m, "min_ratio": m - 0.1, "max_ratio": m + 0.1, "ratios": [m] * 8}
                           for seq, m in medians.items()}}}


def test_scale_goal_follows_the_paired_ratios_when_a_run_has_them():
    """Rows from separate processes that read within 5% do not make the goal met when the paired
    ratios of neighbouring steps say otherwise, and the other way round; without paired ratios the
    rows decide, as before."""
    report = load_report()
    rows = _scale_rows(s256=4.0, s512=3.6, s1024=3.7)  # 0.90x and 0.93x in separate processes
    over = "\n".join(report.scale_goal(rows, _paired(s512=0.93, s1024=1.08)))
    assert "1024: 1.08x (93% interval 1.08x-1.08x; its 8 steps 0.98x-1.18x) — **not met**" in over
    assert "each length in its own process minutes apart: 512: 0.90x, 1024: 0.93x" in over
    assert "**met**" not in over.replace("**not met**", "")
    within = "\n".join(report.scale_goal(_scale_rows(s256=4.0, s512=4.4, s1024=4.6), _paired(s512=0.98, s1024=1.04)))
    assert "1024: 1.04x" in within and "— **met**" in within and "not shown" not in within
    assert "— **met**" in "\n".join(report.scale_goal(rows))  # no paired ratios: the rows' 0.93x decides
    text = report.section({**_run("2026-12-03 06:48", [_bench_row("mlx-dpo-lora", 3.0)], rows),
                           "args": {"rounds": 3, "steps": 3, "warmup": 1, "batch": 2, "seq": 256, "scale": True},
                           "cpus": 2, "matmul_peak_gflops": 260.0, "scale_paired": _paired(s512=0.93, s1024=1.08)})
    assert "`scripts/bench_scale_paired.py --cycles 8`, 2026-12-03 07:27" in text and "1.08x" in text
    assert "on this project's Linux machine (2 CPUs, shared" in text  # results from before the CPU was recorded
    named = report.section({**_run("2026-12-04 00:05", [_bench_row("mlx-dpo-lora", 3.0)], rows),
                            "args": {"rounds": 3, "steps": 3, "warmup": 1, "batch": 2, "seq": 256, "scale": True},
                            "cpus": 2, "cpu": "AMD EPYC, family 25 model 17, AVX-512", "matmul_peak_gflops": 260.0})
    assert "Linux machine (AMD EPYC, family 25 model 17, AVX-512; 2 CPUs, shared" in named


def test_median_interval_takes_the_order_statistics_that_cover_the_median():
    """With 8 values the 2nd and 7th sorted cover the median with probability 1 - 2 (1 + 8) / 256;
    the 3rd and 6th would cover only 71%; 4 values cannot reach 90% at all."""
    report = load_report()
    low, high, coverage = report.median_interval([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])
    assert (low, high) == (2.0, 7.0) and abs(coverage - (1 - 2 * 9 / 256)) < 1e-12
    assert report.median_interval([float(i) for i in range(16)])[:2] == (4.0, 11.0)  # 92%: the 5th and 12th
    assert report.median_interval([1.0, 2.0, 3.0, 4.0]) is None and report.median_interval([]) is None


def test_scale_goal_is_not_decided_by_a_median_whose_interval_holds_1_05():
    """Session 24's runs: medians of 1.02x to 1.06x from ratios spread by +-15%, on either side of
    the 5% bound by chance. A median under 1.05 is not enough: the goal reads met only when the
    interval lies below it, and says when a run decided nothing."""
    report = load_report()
    rows = _scale_rows(s256=4.0, s512=4.0, s1024=4.0)
    spread = _paired(s512=0.98, s1024=1.02)
    spread["lengths"]["1024"]["ratios"] = [1.02, 1.024, 0.968, 0.938, 1.011, 1.188, 1.323, 1.235]  # 17:51's
    text = "\n".join(report.scale_goal(rows, spread))
    assert "93% interval 0.97x-1.24x" in text
    assert "— **not met** (not shown: 1.05 lies inside an interval" in text
