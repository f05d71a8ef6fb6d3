"""covjax.analysis.plots: each figure is written as a readable PNG image."""

import os

import matplotlib.image
from test_analysis_runs import write_run

from covjax.analysis import plots, runs, stats


def assert_png(path):
    assert os.path.getsize(path) > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plots_are_written(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    records = runs.read_metrics(run)
    steps, entropy, accuracy = runs.series(records, ["entropy/token_mean", "accuracy/mean"])
    fit = stats.fit_law(entropy, accuracy)
    dumps = {step: runs.load_cov(path) for step, path in runs.cov_dump_paths(run).items()}
    paths = [
        plots.plot_entropy_and_reward({"run": records, "copy": records[:30]},
                                      str(tmp_path / "curves.png")),
        plots.plot_law_fit({"run": (entropy, accuracy, fit),
                            "unfitted": (entropy, accuracy, None)}, str(tmp_path / "law.png")),
        plots.plot_cov_histogram({"step 20": dumps[20], "step 40": dumps[40]},
                                 str(tmp_path / "cov.png"), clip_cov_lb=1.0, clip_cov_ub=5.0,
                                 kl_cov_ratio=0.02),
        plots.plot_entropy_check({"run": runs.entropy_check_series(records)},
                                 str(tmp_path / "check.png")),
    ]
    for path in paths:
        assert_png(path)
