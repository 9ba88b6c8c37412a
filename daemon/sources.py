"""Frame sources a camera can be: RTSP, HTTP(S) MJPEG, video files, USB (V4L2) and synthetic.

All give RGB uint8 frames (OpenCV decodes BGR; we convert once here). A source that
cannot open or stops giving frames raises SourceError with the reason, and the
capture role decides about reconnecting. Frame sizes are held to
`limits.max_image_pixels`: a still image file by its header before it is decoded, a
stream by the size FFmpeg reports when it opens (and each frame, in case it changes).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import cv2
import numpy as np

from daemon.config import CameraConfig, LimitsConfig
from engine import InputError, check_image_size, image_dimensions


class SourceError(Exception):
    """The source cannot give a frame now; the message is the reason for the log."""


class EndOfStream(SourceError):
    """A non-looping file ran out of frames."""


class FrameSource:
    """Base: open once, read frames, close; `read` raises SourceError on failure."""

    def open(self) -> None:
        """Connect or open; raises SourceError."""

    def read(self) -> np.ndarray:
        """The next RGB frame."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or connection."""


class SyntheticSource(FrameSource):
    """Parts (discs and plates) moving across a brushed-metal belt; every `defect_every`-th
    part carries a scratch or a dent. Frame i depends only on (seed, i), so tests and
    demos are repeatable. `corrupt_every` > 0 makes every n-th frame pure noise with a
    wrong size, to exercise the pipeline's handling of odd frames. `fault_cue` names a file whose
    content turns on a camera fault (freeze, blur, dark), so health checks can be shown and tested."""

    FAULTS = ("freeze", "blur", "dark")
    CUE_EVERY_S = 0.25

    def __init__(self, camera: CameraConfig) -> None:
        spec = camera.synthetic
        self.width, self.height = spec.width, spec.height
        self.seed = spec.seed
        self.defect_every = spec.defect_every
        self.corrupt_every = spec.corrupt_every
        self.cue = Path(spec.fault_cue) if spec.fault_cue else None
        self.fault = ""
        self.cue_checked = 0.0
        self.last: np.ndarray | None = None
        self.index = 0
        rng = np.random.default_rng(spec.seed)
        grain = rng.normal(0, 6, (self.height, 1)).astype(np.float32)
        noise = rng.normal(0, 3, (self.height, self.width)).astype(np.float32)
        belt = 120 + grain + noise
        self.background = np.clip(np.repeat(belt[:, :, None], 3, axis=2) * np.array([1.0, 1.02, 1.05], np.float32), 0, 255).astype(np.uint8)

    def read(self) -> np.ndarray:
        i = self.index
        self.index += 1
        if self.corrupt_every and i % self.corrupt_every == self.corrupt_every - 1:
            rng = np.random.default_rng((self.seed, i))
            return rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        fault = self._fault()
        if fault == "freeze" and self.last is not None:
            return self.last.copy()
        frame = self.frame(i)
        if fault == "blur":
            frame = cv2.GaussianBlur(frame, (0, 0), 4)
        elif fault == "dark":
            frame = (frame // 4).astype(np.uint8)
        self.last = frame
        return frame

    def _fault(self) -> str:
        """The fault named in the cue file ('' when none, unreadable or unknown)."""
        if self.cue is None:
            return ""
        now = time.monotonic()
        if now - self.cue_checked >= self.CUE_EVERY_S:
            self.cue_checked = now
            try:
                text = self.cue.read_text(errors="replace").strip().lower()[:16]
            except OSError:
                text = ""
            self.fault = text if text in self.FAULTS else ""
        return self.fault

    def frame(self, i: int) -> np.ndarray:
        """Frame number i (deterministic)."""
        frame = self.background.copy()
        period = 24
        part = i // period
        step = i % period
        rng = np.random.default_rng((self.seed, part))
        size = int(min(self.width, self.height) * rng.uniform(0.25, 0.4))
        cx = int(-size + (self.width + 2 * size) * step / period)
        cy = self.height // 2 + int(rng.integers(-self.height // 8, self.height // 8 + 1))
        shade = tuple(int(v) for v in rng.integers(170, 230, 3))
        disc = bool(rng.integers(0, 2))
        if disc:
            cv2.circle(frame, (cx, cy), size // 2, shade, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(frame, (cx - size // 2, cy - size // 3), (cx + size // 2, cy + size // 3), shade, -1, cv2.LINE_AA)
        if self.defect_every and part % self.defect_every == self.defect_every - 1:
            if rng.integers(0, 2):
                a = (cx - size // 4, cy - size // 6)
                b = (cx + size // 5, cy + size // 7)
                cv2.line(frame, a, b, (40, 35, 30), max(1, size // 40), cv2.LINE_AA)
            else:
                cv2.circle(frame, (cx + size // 8, cy), max(2, size // 10), (80, 75, 70), -1, cv2.LINE_AA)
        return frame


class OpenCvSource(FrameSource):
    """RTSP (over TCP), HTTP(S) MJPEG, video files and USB cameras, all through OpenCV.

    Network sources get open and read timeouts so a dead camera is an error after
    seconds, not a hang; files can loop so a recorded clip can stand in for a camera.
    """

    def __init__(self, camera: CameraConfig, max_pixels: int = LimitsConfig().max_image_pixels) -> None:
        self.camera = camera
        self.kind = camera.source_kind
        self.max_pixels = max_pixels
        self.cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        source = self.camera.source
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.camera.open_timeout_s * 1000),
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.camera.read_timeout_s * 1000)]
        if self.kind == "rtsp":
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"
            cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts)
        elif self.kind == "http":
            cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts)
        elif self.kind == "usb":
            device = source if source.startswith("/dev/") else f"/dev/video{source}"
            if not Path(device).exists():
                raise SourceError(f"USB camera {device} is absent (is it plugged in, and is the user in group 'video'?)")
            index = int(re.sub(r"\D", "", device))
            cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
        else:
            if not Path(source).is_file():
                raise SourceError(f"video file {source} does not exist")
            self._check_still_image(Path(source))
            cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            reasons = ("unreachable, refused, wrong user or password, or not a video" if self.kind in ("rtsp", "http")
                       else "not a video OpenCV can decode" if self.kind == "file" else "busy or not a capture device")
            raise SourceError(f"cannot open {self._safe_source()} ({reasons})")
        try:
            self._check_pixels(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        except SourceError:
            cap.release()
            raise
        self.cap = cap

    def _check_still_image(self, path: Path) -> None:
        """A still image given as a file source is held to the pixel limit by its header."""
        try:
            with open(path, "rb") as handle:
                head = handle.read(65536)
            if image_dimensions(head) is not None:
                check_image_size(head, str(path), self.max_pixels)
        except (OSError, InputError) as err:
            raise SourceError(str(err)) from None

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise SourceError(f"{self._safe_source()}: frames are {width}×{height} ({width * height / 1e6:.1f} MP), over "
                              f"the limit of {self.max_pixels / 1e6:g} MP (limits.max_image_pixels)")

    def read(self) -> np.ndarray:
        if self.cap is None:
            raise SourceError("source is not open")
        ok, frame = self.cap.read()
        if not ok and self.kind == "file" and self.camera.loop:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.cap.read()
        if not ok or frame is None:
            if self.kind == "file" and not self.camera.loop:
                raise EndOfStream(f"end of {self.camera.source}")
            raise SourceError(f"no frame from {self._safe_source()} (stream ended, timed out or undecodable)")
        self._check_pixels(frame.shape[1], frame.shape[0])
        if frame.ndim == 2:
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None

    def _safe_source(self) -> str:
        """The source with any password removed, for logs."""
        return re.sub(r"//[^/@]*:[^/@]*@", "//***@", self.camera.source)


def open_source(camera: CameraConfig, max_pixels: int = LimitsConfig().max_image_pixels) -> FrameSource:
    """The reader for a camera's source kind (not yet opened); frames over `max_pixels` are refused."""
    if camera.source_kind == "synthetic":
        return SyntheticSource(camera)
    return OpenCvSource(camera, max_pixels)


def apply_roi(frame: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop to the region of interest (clipped to the frame); the engine sees only this."""
    if roi is None:
        return frame
    x, y, w, h = roi
    crop = frame[y:y + h, x:x + w]
    if crop.size == 0:
        raise SourceError(f"roi {list(roi)} lies outside the {frame.shape[1]}x{frame.shape[0]} frame")
    return np.ascontiguousarray(crop)
