"""Make the napari plugin screenshots of the README: ``docs/napari_train.png`` and ``docs/napari_predict.png``.

Usage (needs ``embseg[napari]``; starts Xvfb itself when there is no display)::

    python docs/napari_screenshots.py [--model nuclei-2d] [--epochs 6] [--workdir /tmp/embseg-shots]

The train screenshot is a real short training run on the ``dsb-dense`` sample (image + mask layers).
The predict screenshot segments the ``dsb-clustered`` sample with ``--model`` (a shipped name or a
model folder), or, when none is given, with the model that the short training just produced.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent


def start_display() -> subprocess.Popen | None:
    """Xvfb on a free display when ``DISPLAY`` is unset (the xcb platform renders OpenGL there)."""
    if os.environ.get("DISPLAY"):
        return None
    read_fd, write_fd = os.pipe()
    # a watcher shell stops Xvfb once this process has exited
    watcher = f'"$0" "$@" & x=$!; while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; kill $x'
    proc = subprocess.Popen(["sh", "-c", watcher, shutil.which("Xvfb") or "Xvfb", "-displayfd", str(write_fd),
                             "-screen", "0", "1920x1080x24", "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number, deadline = b"", time.monotonic() + 30
    while not number.endswith(b"\n") and select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(read_fd, 16)
        if not chunk:
            break
        number += chunk
    os.close(read_fd)
    if not number.strip():
        raise SystemExit("Xvfb did not start")
    os.environ["DISPLAY"] = ":" + number.decode().strip()
    return proc


def wait(widget: Any, app: Any, timeout: float = 7200.0) -> None:
    """Process Qt events until the widget's worker has finished."""
    start = time.monotonic()
    while widget.running and time.monotonic() - start < timeout:
        app.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model for the predict screenshot (default: the trained one)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embseg-screenshots"))
    args = parser.parse_args()
    display = start_display()
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    import napari
    from qtpy.QtWidgets import QApplication

    from embseg.napari._common import FOLDER_CHOICE
    from embseg.napari._predict import PredictWidget
    from embseg.napari._train import TrainWidget

    app = QApplication.instance() or napari.qt.get_qapp()
    shutil.rmtree(args.workdir, ignore_errors=True)
    output = args.workdir / "dsb-demo"

    viewer = napari.Viewer(show=True, title="embseg: train")
    viewer.window._qt_window.resize(1900, 1000)
    viewer.open_sample("embseg", "dsb-dense")
    viewer.layers["dsb-dense mask"].visible = False
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="embseg: Train", area="right")
    train.reset_choices()
    train.image.value = viewer.layers["dsb-dense"]
    train.labels.value = viewer.layers["dsb-dense mask"]
    train.output.value = output
    train.epochs.value = args.epochs
    train.samples_per_epoch.value = 64
    train.batch_size.value = 4
    train.val_every.value = 1
    train.start()
    wait(train, app)
    print(train.status.value)
    viewer.layers["embseg preview"].opacity = 0.6
    app.processEvents()
    viewer.screenshot(str(DOCS / "napari_train.png"), canvas_only=False)
    viewer.close()

    viewer = napari.Viewer(show=True, title="embseg: predict")
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("embseg", "dsb-clustered")
    viewer.layers["dsb-clustered mask"].visible = False
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="embseg: Predict", area="right")
    predict.reset_choices()
    predict.image.value = viewer.layers["dsb-clustered"]
    if args.model and args.model in predict.model_choice.choices:
        predict.model_choice.value = args.model
    else:
        predict.model_choice.value = FOLDER_CHOICE
        predict.model_folder.value = Path(args.model) if args.model else output
    predict.add_seeds.value = True
    predict.run()
    wait(predict, app)
    print(predict.status.value)
    viewer.layers["dsb-clustered seeds"].visible = False
    viewer.layers["dsb-clustered labels"].opacity = 0.6
    app.processEvents()
    viewer.screenshot(str(DOCS / "napari_predict.png"), canvas_only=False)
    viewer.close()
    del display  # Xvfb ends with this process (see start_display)


if __name__ == "__main__":
    main()
