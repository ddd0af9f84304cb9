"""A GStreamer pipeline as a video source, through OpenCV (Jetson CSI cameras).

    favor-rt run "gst:nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,\
framerate=30/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink \
drop=true max-buffers=2" --audio hw:0

A CSI camera on a Jetson is reached through ``nvarguscamerasrc``, not V4L2, so PyAV cannot open it;
OpenCV built with GStreamer (JetPack's build is) runs the pipeline and hands BGR frames from its
``appsink``. Each frame is stamped with the wall-clock time it arrived (``time.time()``), the clock the
ALSA / PulseAudio inputs stamp, so ``--audio`` merges on one clock (runtime/merged_source.py). The
pipeline's own buffer times are running times from an unknown base, so they are not used.

Unverified here: no OpenCV with GStreamer and no Jetson on the development machine (tests skip with the
reason); README lists it. ``appsink drop=true max-buffers=2`` keeps the pipeline from queueing stale
frames when the consumer is slow (latest wins, as the capture rings).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import av

from runtime.sources import NETWORK_TIMEOUT_S, Frame, SourceError


class _VideoInfo:
    """What the assembler and the CLI read of a video stream (a PyAV stream stand-in)."""

    type = "video"

    def __init__(self, rate: float | None):
        self.average_rate = rate
        self.start_time = None
        self.time_base = None


class GstSource:
    """``gst:<pipeline>`` (ending in ``appsink``) through cv2.VideoCapture(..., cv2.CAP_GSTREAMER)."""

    kind = "gst"
    live = True  # a camera: arrives at its own pace
    origin = None  # wall-clock stamps: the assembler takes the first frame's time
    audio = None
    own_audio = False
    skipped_packets = 0

    def __init__(self, spec: str, sample_rate: int = 16_000, timeout: float = NETWORK_TIMEOUT_S):
        self.spec, self.sample_rate, self.timeout = spec, sample_rate, timeout
        pipeline = spec[len("gst:"):].strip()
        if not pipeline:
            raise SourceError(f"{spec}: give a GStreamer pipeline ending in appsink after 'gst:'")
        try:
            import cv2
        except ImportError:
            raise SourceError(f"{spec}: a GStreamer pipeline needs OpenCV built with GStreamer "
                              "(python3-opencv on Jetson); cv2 is not installed") from None
        if "GStreamer:                   YES" not in cv2.getBuildInformation():
            raise SourceError(f"{spec}: this OpenCV ({cv2.__version__}) is built without GStreamer")
        self._cv2 = cv2
        self.capture = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        if not self.capture.isOpened():
            raise SourceError(f"{spec}: GStreamer could not start the pipeline (check it with gst-launch-1.0)")
        rate = self.capture.get(cv2.CAP_PROP_FPS)
        self.video = _VideoInfo(float(rate) if rate and rate > 0 else None)

    @property
    def frame_rate(self) -> float | None:
        return self.video.average_rate

    def close(self) -> None:
        self.capture.release()

    def __iter__(self) -> Iterator[Frame]:
        duration = 1.0 / self.frame_rate if self.frame_rate else 0.0
        while True:
            ok, bgr = self.capture.read()  # uint8 [H, W, 3]
            if not ok:  # end of stream (num-buffers, EOS) or the camera went away
                return
            t = time.time()  # arrival = capture time up to the pipeline's latency
            rgb = self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)
            yield Frame(t, av.VideoFrame.from_ndarray(rgb, format="rgb24"), duration)
