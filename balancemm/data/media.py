"""Decoding of the raw media files of the audio-visual datasets, with PyAV (FFmpeg's libraries, no ``ffmpeg``
binary) for audio and video and Pillow for still images.

The original preprocessing scripts (OGM-GE_CVPR2022, Modal-Imbalance-PMR, MMPareto_ICML2024, BalanceBenchmark)
load audio with librosa and cut frames with OpenCV or the ffmpeg CLI; this module gives the same arrays from
one library:

* audio: mono by averaging the channels (librosa's ``to_mono``), floats as decoded (16-bit PCM / 32768),
  resampled by libswresample instead of librosa's soxr;
* frames: one frame per ``1 / fps`` seconds chosen by presentation time (see :func:`decode_frames`);
* images: JPEG frame folders and the JPEG bytes stored in BalancedAV's hdf5 files.

Every failure is a :class:`MediaError` whose message starts with the file, so a prepare run can name the
clip that broke it. A file that decodes to less than it declares is an error, never a shorter array: a
half-decoded clip must not be stored silently.

``av`` and ``PIL`` are imported inside the functions: only preparing raw data needs them.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from balancemm.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

# A stream that decodes shorter than the duration its header declares, by more than this, was cut off.
# Generous on purpose: audio and video of one container legitimately end a few packets apart.
_TRUNCATION_TOLERANCE_S = 0.5
_TRUNCATION_TOLERANCE_FRACTION = 0.1


class MediaError(DataError):
    """A media file that cannot be decoded; the message is ``"<path>: <reason>"``."""


def _reason(exc: BaseException) -> str:
    # FFmpeg errors carry the bare reason in strerror; their str() repeats the errno and the path.
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


@contextmanager
def _opened(path: Path, what: str) -> Iterator[Any]:
    """``av.open(path)``, with every FFmpeg or OS error turned into a MediaError about ``what``."""
    import av

    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    try:
        with av.open(str(path)) as container:
            yield container
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot decode {what} ({_reason(exc)})") from None


def _riff_declared_seconds(path: Path) -> float | None:
    """The duration a WAV header declares (data chunk size / byte rate), or None if not a readable RIFF WAV.

    FFmpeg clamps a WAV's duration to the bytes present, so only the header itself shows a cut-off file.
    """
    with path.open("rb") as f:
        if f.read(4) != b"RIFF" or f.read(8)[4:] != b"WAVE":
            return None
        byte_rate = None
        while len(header := f.read(8)) == 8:
            chunk, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk == b"fmt " and size >= 12:
                byte_rate = struct.unpack("<8xI", f.read(12))[0]  # after format, channels, sample rate
                size -= 12
            elif chunk == b"data":
                # 0 and 0xFFFFFFFF mark a length unknown to a streaming writer.
                return size / byte_rate if byte_rate and size not in (0, 0xFFFFFFFF) else None
            f.seek(size + (size & 1), io.SEEK_CUR)  # chunks are padded to an even size
    return None


def _declared_seconds(path: Path, container: Any, stream: Any) -> float | None:
    """The duration a file's header promises for ``stream``: the WAV header's, the stream's, or the container's."""
    if container.format.name == "wav":
        return _riff_declared_seconds(path)
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _check_complete(path: Path, container: Any, stream: Any, decoded_s: float, what: str) -> None:
    declared = _declared_seconds(path, container, stream)
    if declared is None:
        return
    if declared - decoded_s > max(_TRUNCATION_TOLERANCE_S, _TRUNCATION_TOLERANCE_FRACTION * declared):
        raise MediaError(
            f"{path}: truncated {what} (decoded {decoded_s:.2f} s of the {declared:.2f} s the file declares)"
        )


def decode_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode the first audio stream of a file (.wav, .flv, .mp4, …) to mono at ``sample_rate``.

    Returns:
        ``[N]`` float32, the channel average (librosa's convention) of the samples as decoded (16-bit PCM
        is divided by 32768), resampled by libswresample. Its filter differs slightly from librosa's
        default soxr resampler, so values differ from ``librosa.load(sr=...)`` by a small amount near
        the band edge; lengths agree up to the resamplers' rounding of a sample or two.
    Raises:
        MediaError: missing file, no or empty audio stream, corrupt or truncated data.
    """
    import av

    path = Path(path)
    with _opened(path, "audio") as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        # Resample every channel and average afterwards: swresample's own downmix weights the channels
        # (and would differ from librosa for stereo), the plain mean does not.
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        chunks: list[np.ndarray] = []
        for frame in container.decode(stream):
            chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        if not chunks or sum(c.shape[1] for c in chunks) == 0:
            raise MediaError(f"{path}: the audio stream is empty")
        wave = np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float64).astype(np.float32)
        _check_complete(path, container, stream, wave.shape[0] / sample_rate, "audio")
    return wave


def _resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Shrink ``image`` so its shorter side is ``short_side``; a smaller image is kept as it is, since the
    loader resizes to the model's input anyway and an upscaled copy only costs disk (many times the raw)."""
    from PIL import Image

    w, h = image.size
    if min(w, h) <= short_side:
        return image
    scale = short_side / min(w, h)
    size = (short_side, round(h * scale)) if w <= h else (round(w * scale), short_side)
    return image if size == (w, h) else image.resize(size, Image.Resampling.BILINEAR)


def decode_frames(path: str | Path, fps: float = 1.0, short_side: int | None = None) -> np.ndarray:
    """Decode ``fps`` frames per second of a video's first video stream.

    For k = 0, 1, 2, … the first decoded frame whose presentation time, counted from the first frame,
    is ≥ k / fps is kept (a frame is kept once even if a gap in a variable-rate stream makes it the first
    for several k). The OpenCV-era scripts (OGM-GE, PMR) keep instead every frame whose index is a
    multiple of int(video fps / fps); for a constant frame rate whose period divides 1 / fps both choose
    the same frames, and the time-based choice stays right for variable-rate streams and rates such as
    29.97 fps, where index arithmetic drifts.

    Args:
        fps: frames kept per second of video.
        short_side: if given, each kept frame whose shorter side is longer is shrunk (PIL bilinear) so its
            shorter side is ``short_side`` pixels, the aspect ratio kept (the longer side rounded); smaller
            frames are never enlarged.
    Returns:
        ``[T, H, W, 3]`` uint8 RGB.
    Raises:
        MediaError: missing file, no video stream, no frame, corrupt or truncated data (also when some
        frames were decoded before the error).
    """
    kept, _ = _decode_frames(Path(path), fps, short_side, successors=False)
    return kept


def decode_frame_pairs(
    path: str | Path, fps: float = 1.0, short_side: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The frames :func:`decode_frames` keeps, and the decoded frame right after each (optical flow).

    Returns:
        ``(frames, successors)``, both ``[T, H, W, 3]`` uint8 RGB; a kept frame that is the video's last
        has no successor and is left out.
    Raises:
        MediaError: as :func:`decode_frames`, and for a video of a single frame.
    """
    kept, after = _decode_frames(Path(path), fps, short_side, successors=True)
    assert after is not None
    return kept, after


def _decode_frames(
    path: Path, fps: float, short_side: int | None, successors: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    if fps <= 0:
        raise ValueError(f"decode_frames: fps must be positive, got {fps}")
    kept: list[np.ndarray] = []
    after: list[np.ndarray] = []
    with _opened(path, "video") as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        first = last = None
        next_k = 0
        waiting = False  # the previous frame was kept and waits for its successor
        for index, frame in enumerate(container.decode(stream)):
            # A frame without a timestamp (raw elementary streams) falls back on its index at the declared
            # rate, or at 25 fps, FFmpeg's own assumption for such streams.
            t = frame.time if frame.time is not None else index / float(stream.average_rate or 25)
            first = t if first is None else first
            last = t
            elapsed = t - first
            # 1e-6 s of slack: millisecond time bases put the 25 fps frame at 1 s on exactly 1.000.
            keep = elapsed * fps >= next_k - 1e-6
            if not (keep or waiting):
                continue
            image = frame.to_image()
            if short_side is not None:
                image = _resize_short_side(image, short_side)
            pixels = np.asarray(image, dtype=np.uint8)
            if waiting:
                after.append(pixels)
            if keep:
                kept.append(pixels)
                next_k = int(np.floor(elapsed * fps + 1e-6)) + 1
            waiting = keep and successors
        if waiting:
            kept.pop()
        if not kept or first is None or last is None:
            what = "fewer than two video frames (optical flow needs a frame pair)" if successors else "no video frame"
            raise MediaError(f"{path}: {what}")
        period = 1 / float(stream.average_rate) if stream.average_rate else 0.0
        _check_complete(path, container, stream, last - first + period, "video")
    if len({f.shape for f in kept + after}) > 1:
        sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in kept + after})
        raise MediaError(f"{path}: the frame size changes within the video ({', '.join(sizes)})")
    return np.stack(kept), np.stack(after) if successors else None


def decode_image(data: bytes | str | Path, short_side: int | None = None, *, name: str | None = None) -> np.ndarray:
    """Decode a still image (a JPEG frame file, or encoded bytes such as a BalancedAV hdf5 entry).

    Args:
        data: a path, or the encoded bytes.
        short_side: as in :func:`decode_frames`.
        name: how error messages call ``data`` when it is bytes (e.g. ``"video/ab12.hdf5[3]"``).
    Returns:
        ``[H, W, 3]`` uint8 RGB.
    Raises:
        MediaError: missing file, or bytes that are not a complete image.
    """
    from PIL import Image

    if isinstance(data, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        source: Any = io.BytesIO(data)
    else:
        label = str(data)
        source = Path(data)
        if not source.is_file():
            raise MediaError(f"{label}: file not found")
    try:
        with Image.open(source) as opened:
            image = opened.convert("RGB")  # decodes fully, so a truncated JPEG fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{label}: cannot decode image ({exc})") from None
    if short_side is not None:
        image = _resize_short_side(image, short_side)
    return np.asarray(image, dtype=np.uint8)
