"""What the Predict and Train widgets share: one background worker at a time (no torch here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, Label, ProgressBar, PushButton

if TYPE_CHECKING:
    import napari


class _Lifetime:
    """Whether the widget still exists, and its current worker.

    The widget can be deleted while its worker runs (a viewer closed mid-run). The handler of
    the widget's ``destroyed`` signal holds this object, not the widget, and ends the worker.
    """

    def __init__(self) -> None:
        self.alive = True
        self.worker: Any = None

    def end(self, *_: Any) -> None:
        self.alive = False
        if self.worker is not None:
            self.worker.quit()

    def quitting(self) -> bool:
        """Whether the current worker was asked to quit (widget deleted, or napari quitting)."""
        return not self.alive or (self.worker is not None and self.worker.abort_requested)


class WorkerWidget(Container):
    """A widget that runs one napari ``thread_worker`` at a time.

    It has a start and a stop button (enabled while idle / running), a progress bar and a
    status line; user errors show in the status line and as a napari notification. The worker's
    signals reach the widget only while it exists, and deleting the widget asks the worker to
    quit (napari waits for its workers when it quits).

    Parameters
    ----------
    napari_viewer
        The viewer.
    start_text, stop_text
        Texts of the two buttons.
    progress_label
        Label of the progress bar.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, start_text: str, stop_text: str,
                 progress_label: str) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.worker: Any = None
        self._running = False
        self._life = _Lifetime()
        life = self._life
        self.native.destroyed.connect(lambda *_: life.end())
        self.start_button = PushButton(text=start_text)
        self.stop_button = PushButton(text=stop_text, enabled=False)
        self.progress = ProgressBar(label=progress_label, value=0, min=0, max=1)
        self.status = Label(label="status", value="")

    @property
    def running(self) -> bool:
        """Whether a worker is started and has not finished yet."""
        return self._running

    def _set_running(self, running: bool) -> None:
        self._running = running
        self.start_button.enabled = not running
        self.stop_button.enabled = running

    def _while_alive(self, slot: Callable[..., Any]) -> Callable[..., None]:
        """``slot``, called only while the widget exists (for signals of the worker thread)."""
        life = self._life

        def call(*args: Any) -> None:
            if life.alive:
                slot(*args)

        return call

    def _launch(self, worker: Any, on_returned: Callable[[Any], Any]) -> Any:
        """Connect ``worker``'s signals, mark the widget running and start the worker."""
        self.worker = worker
        self._life.worker = worker
        worker.returned.connect(self._while_alive(on_returned))
        # napari itself shows a worker's exception as a notification
        worker.errored.connect(self._while_alive(lambda err: setattr(self.status, "value", f"error: {err}")))
        worker.finished.connect(self._while_alive(lambda: self._set_running(False)))
        self._set_running(True)
        worker.start()
        return worker

    def _fail(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.value = f"error: {message}"
        show_error(f"embseg: {message}")
