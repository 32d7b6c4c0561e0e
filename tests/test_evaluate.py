"""Tests of embseg.evaluate and the `embseg evaluate` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embseg.cli import main
from embseg.errors import UserError
from embseg.evaluate import evaluate_folders, format_report, write_json
from embseg.io import write_labels

DSB_TEST_MASKS = Path("/work/shared/data/dsb2018_fluo/test/masks")


def squares(shape, corners, size):
    labels = np.zeros(shape, np.uint16)
    for k, corner in enumerate(corners, start=1):
        labels[tuple(slice(c, c + size) for c in corner)] = k
    return labels


@pytest.fixture
def folders(tmp_path):
    """Two images: a perfect prediction, and one with a missed and a shifted object."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    a = squares((32, 32), [(2, 2), (12, 12), (22, 22)], 8)
    b = squares((32, 32), [(4, 4), (20, 4)], 6)
    b_pred = np.zeros_like(b)
    b_pred[4:10, 5:11] = 9  # IoU 30/42 = 0.714 with object 1; object 2 missed
    write_labels(gt / "a.tif", a)
    write_labels(pred / "a.tif", a)
    write_labels(gt / "b.tif", b)
    write_labels(pred / "b.tiff", b_pred)
    return gt, pred


def test_evaluate_folders_figures(folders):
    gt, pred = folders
    result = evaluate_folders(gt, pred, thresholds=[0.5, 0.7, 0.75])
    assert result["thresholds"] == [0.5, 0.7, 0.75]
    assert result["tp"] == [4, 4, 3]
    assert result["fp"] == [0, 0, 1]
    assert result["fn"] == [1, 1, 2]
    assert result["ap_pooled"] == pytest.approx([4 / 5, 4 / 5, 3 / 6])
    assert result["ap_per_image"] == pytest.approx([(1 + 1 / 2) / 2, (1 + 1 / 2) / 2, 1 / 2])
    assert result["per_image"]["b"] == pytest.approx([1 / 2, 1 / 2, 0.0])
    assert (result["n_images"], result["n_true"], result["n_pred"]) == (2, 5, 4)
    assert result["f1_at_0.5"]["pooled"] == pytest.approx(8 / 9)
    assert result["f1_at_0.5"]["per_image"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["pq_at_0.5"]["pooled"] == pytest.approx((3 + 30 / 42) / 4.5)


def test_report_at_05_when_not_requested(folders):
    gt, pred = folders
    result = evaluate_folders(gt, pred, thresholds=[0.75])
    assert result["tp"] == [3]
    assert result["f1_at_0.5"]["pooled"] == pytest.approx(8 / 9)


def test_default_thresholds_by_ndim(folders, tmp_path):
    gt, pred = folders
    assert len(evaluate_folders(gt, pred)["thresholds"]) == 9
    assert evaluate_folders(gt, pred)["thresholds"][0] == 0.5
    volume = np.zeros((4, 8, 8), np.uint16)
    volume[1:3, 2:6, 2:6] = 1
    write_labels(tmp_path / "g3" / "v.tif", volume)
    write_labels(tmp_path / "p3" / "v.tif", volume)
    result = evaluate_folders(tmp_path / "g3", tmp_path / "p3")
    assert result["thresholds"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert result["ap_pooled"] == [1.0] * 9


def test_shape_mismatch_names_both(folders):
    gt, pred = folders
    write_labels(pred / "a.tif", np.zeros((30, 32), np.uint16), overwrite=True)
    with pytest.raises(UserError, match=r"gt/a\.tif.*pred/a\.tif.*shape"):
        evaluate_folders(gt, pred)


def test_bad_thresholds(folders):
    gt, pred = folders
    with pytest.raises(UserError, match="thresholds"):
        evaluate_folders(gt, pred, thresholds=[0.5, 1.5])
    with pytest.raises(UserError, match="thresholds"):
        evaluate_folders(gt, pred, thresholds=[])


def test_format_report(folders):
    gt, pred = folders
    text = format_report(evaluate_folders(gt, pred, thresholds=[0.5, 0.75]))
    lines = text.splitlines()
    assert lines[0] == "2 images: 5 ground-truth objects, 4 predicted objects"
    assert lines[1].split() == ["IoU", "AP", "pooled", "AP", "mean/image", "TP", "FP", "FN"]
    assert lines[2].split() == ["0.50", "0.800", "0.750", "4", "0", "1"]
    assert lines[3].split() == ["0.75", "0.500", "0.500", "3", "1", "2"]
    assert lines[4] == "F1 at IoU 0.5: 0.889 pooled, 0.833 mean/image"
    assert lines[5].startswith("PQ at IoU 0.5: 0.")


def test_write_json(folders, tmp_path):
    gt, pred = folders
    result = evaluate_folders(gt, pred, thresholds=[0.5])
    path = write_json(result, tmp_path / "r.json")
    assert json.loads(path.read_text()) == result
    with pytest.raises(UserError, match="exists"):
        write_json(result, path)
    write_json(result, path, overwrite=True)


# ---------------------------------------------------------------------------- CLI


def test_cli_evaluate_prints_table_and_json(folders, tmp_path, capsys):
    gt, _ = folders
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(gt), str(gt), "--thresholds", "0.5,0.9", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[2].split() == ["0.50", "1.000", "1.000", "5", "0", "0"]
    assert text.splitlines()[3].split() == ["0.90", "1.000", "1.000", "5", "0", "0"]
    data = json.loads(out.read_text())
    expected = {"thresholds", "ap_pooled", "ap_per_image", "tp", "fp", "fn", "f1_at_0.5"}
    assert expected | {"pq_at_0.5", "n_images", "n_true", "n_pred", "per_image"} <= set(data)
    assert data["ap_pooled"] == [1.0, 1.0]


def test_cli_missing_pairs_exit_2(folders, capsys):
    gt, pred = folders
    (pred / "a.tif").unlink()
    assert main(["evaluate", str(gt), str(pred)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embseg: error: ") and "\n" not in err
    assert "a.tif" in err and "without a prediction" in err


def test_cli_bad_thresholds_exit_2(folders, capsys):
    gt, pred = folders
    assert main(["evaluate", str(gt), str(pred), "--thresholds", "0.5,abc"]) == 2
    assert "--thresholds" in capsys.readouterr().err


def test_cli_on_real_masks(capsys):
    if not DSB_TEST_MASKS.exists():
        pytest.skip("real data not available")
    assert main(["evaluate", str(DSB_TEST_MASKS), str(DSB_TEST_MASKS)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "51 images: 2218 ground-truth objects, 2218 predicted objects"
    rows = [line.split() for line in lines[2:11]]
    assert [row[0] for row in rows] == [
        "0.50",
        "0.55",
        "0.60",
        "0.65",
        "0.70",
        "0.75",
        "0.80",
        "0.85",
        "0.90",
    ]
    assert all(row[1:4] == ["1.000", "1.000", "2218"] and row[4:] == ["0", "0"] for row in rows)
    assert lines[11] == "F1 at IoU 0.5: 1.000 pooled, 1.000 mean/image"
    assert lines[12] == "PQ at IoU 0.5: 1.000 pooled, 1.000 mean/image"
