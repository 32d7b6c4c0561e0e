"""`make demo` / `embseg demo`: the shipped model on the bundled samples, end to end."""

from __future__ import annotations

import numpy as np

from embseg.cli import main
from embseg.demo import run_demo
from embseg.io import read_labels
from embseg.metrics import matching
from embseg.samples import sample


def test_demo_segments_the_bundled_samples_with_the_shipped_model(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out)
    records = result["images"]
    assert len(records) >= 2
    for record in records:
        labels = read_labels(out / f"{record['name']}_labels.tif")
        assert int(labels.max()) == record["n_pred"] > 0
        assert (out / f"{record['name']}_overlay.png").stat().st_size > 0
        # The scores reported are those of the written labels against the bundled masks.
        truth = sample(record["name"]).mask
        assert abs(matching(truth, labels, thresh=0.5).accuracy - record["ap"][0.5]) < 1e-12
    assert (out / "contact_sheet.png").stat().st_size > 0
    # The shipped model scores 0.806 mean AP@0.5 on these samples (`make demo`); a broken prediction
    # path (network, folding, clustering) falls far below.
    assert np.mean([r["ap"][0.5] for r in records]) >= 0.75
    assert result["table"].splitlines()[-1].startswith("mean")


def test_demo_command_line(tmp_path, capsys):
    out = tmp_path / "cli-demo"
    assert main(["demo", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and str(out) in printed
    assert (out / "contact_sheet.png").is_file()
