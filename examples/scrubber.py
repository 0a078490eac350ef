"""A slider over a video: drag it, and the frame under it shows, the GUI never waiting.

    python examples/scrubber.py [VIDEO]

Without a video it shows the built-in sample clip. The frames come from a private frame
server started in the background (the window appears at once); the newest position always
wins: frames the slider passed before they arrived are never shown.
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QApplication, QLabel, QSlider, QVBoxLayout, QWidget

from asyncframes.qt import Scrubber


class ScrubberWindow(QWidget):
    """A QSlider over the frames of ``video`` and a QLabel showing the one it points at."""

    def __init__(self, video: str) -> None:
        super().__init__()
        self.setWindowTitle(f"asyncframes scrubber: {video}")
        self.scrubber = Scrubber(video, parent=self)
        self.label = QLabel("starting the frame server...")
        self.label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setEnabled(False)
        layout = QVBoxLayout(self)
        layout.addWidget(self.label)
        layout.addWidget(self.slider)
        #: The frame on show and its index (what a test checks).
        self.frame: Optional[np.ndarray] = None
        self.shown: Optional[int] = None
        self.scrubber.source.infoReady.connect(self._on_info)
        self.scrubber.frameReady.connect(self._on_frame)
        self.scrubber.failed.connect(lambda exc: self.label.setText(f"error: {exc}"))
        self.slider.valueChanged.connect(self.scrubber.show)
        self.scrubber.source.request_info(video)

    def _on_info(self, info) -> None:
        self.slider.setRange(0, info.frame_count - 1)
        self.slider.setEnabled(True)
        self.scrubber.show(0)

    def _on_frame(self, index: int, frame: np.ndarray) -> None:
        self.frame, self.shown = frame, index
        h, w, c = frame.shape
        fmt = QImage.Format.Format_RGB888 if c == 3 else QImage.Format.Format_Grayscale8
        image = QImage(frame.data, w, h, frame.strides[0], fmt).copy()  # Qt keeps its own pixels
        self.label.setPixmap(QPixmap.fromImage(image))

    def closeEvent(self, event) -> None:  # noqa: N802  (Qt's name)
        self.scrubber.close()
        super().closeEvent(event)


def main() -> int:
    app = QApplication(sys.argv)
    if len(sys.argv) > 1:
        video = sys.argv[1]
    else:
        from asyncframes._sample import sample_video

        video = str(sample_video())
    window = ScrubberWindow(video)
    window.resize(720, 560)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
