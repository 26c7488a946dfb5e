"""Media decoding: samples and frames survive a write/decode round trip, frames are chosen by time, and
every broken file is a MediaError that names it."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from balancemm.data.media import MediaError, decode_audio, decode_frames, decode_image
from balancemm.errors import DataError
from tests.fixtures.media import color_frames, tone, write_video, write_wav

H, W, FPS, SECONDS = 48, 64, 25, 3
PALETTE = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.uint8)  # one colour per second
FLV_RATE = 22050  # FLV's MP3 takes 44.1, 22.05 or 11.025 kHz


def _per_second_frames() -> np.ndarray:
    return np.repeat(np.broadcast_to(PALETTE[:, None, None, :], (SECONDS, H, W, 3)), FPS, axis=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wav, an flv and an mp4 with a 440 Hz tone, the videos showing PALETTE[k] during second k."""
    root = tmp_path_factory.mktemp("media")
    frames = _per_second_frames()
    paths = {"wav": root / "clip.wav", "flv": root / "clip.flv", "mp4": root / "clip.mp4", "mute": root / "mute.mp4"}
    write_wav(paths["wav"], tone(440, 1.5, 16000), 16000)
    write_video(paths["flv"], frames, FPS, tone(440, SECONDS, FLV_RATE), FLV_RATE)
    write_video(paths["mp4"], frames, FPS, tone(440, SECONDS, 16000), 16000)
    write_video(paths["mute"], frames[:FPS], FPS)
    return paths


def _peak_hz(wave: np.ndarray, sr: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave))) * sr / wave.shape[0])


def test_wav_round_trip_is_exact_up_to_int16_rounding(tmp_path: Path) -> None:
    wave = np.clip(0.4 * np.random.default_rng(0).normal(size=8000), -0.99, 0.99).astype(np.float32)
    write_wav(tmp_path / "a.wav", wave, 16000)
    decoded = decode_audio(tmp_path / "a.wav", 16000)
    assert decoded.dtype == np.float32 and decoded.shape == (8000,)
    np.testing.assert_allclose(decoded, wave, rtol=0, atol=0.5 / 32768 + 1e-7)


def test_stereo_is_the_channel_average(tmp_path: Path) -> None:
    left, right = tone(300, 0.5, 16000), tone(700, 0.5, 16000, amplitude=0.2)
    write_wav(tmp_path / "s.wav", np.stack([left, right]), 16000)
    np.testing.assert_allclose(decode_audio(tmp_path / "s.wav", 16000), (left + right) / 2, atol=2e-5)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_keeps_duration_and_pitch(media: dict[str, Path], rate: int) -> None:
    wave = decode_audio(media["wav"], rate)
    assert wave.shape == (round(1.5 * rate),)
    assert abs(_peak_hz(wave, rate) - 440) < 1.0


@pytest.mark.parametrize("kind", ["flv", "mp4"])
def test_audio_of_a_video(media: dict[str, Path], kind: str) -> None:
    wave = decode_audio(media[kind], 16000)
    # Lossy codecs add priming/padding samples at the ends: a frame or two, never a fraction of a second.
    assert abs(wave.shape[0] - SECONDS * 16000) < 0.1 * 16000
    assert abs(_peak_hz(wave, 16000) - 440) < 1.0
    assert 0.4 < np.abs(wave).max() < 0.7  # the tone's amplitude 0.5, give or take the codec


@pytest.mark.parametrize("kind", ["flv", "mp4"])
def test_one_frame_per_second_is_the_frame_shown_at_that_second(media: dict[str, Path], kind: str) -> None:
    frames = decode_frames(media[kind], fps=1.0)
    assert frames.shape == (SECONDS, H, W, 3) and frames.dtype == np.uint8
    mean_colour = frames.reshape(SECONDS, -1, 3).mean(axis=1)
    np.testing.assert_allclose(mean_colour, PALETTE, atol=12)  # YUV 4:2:0 and the codec move colours slightly


@pytest.mark.parametrize("kind", ["flv", "mp4"])
def test_two_frames_per_second(media: dict[str, Path], kind: str) -> None:
    frames = decode_frames(media[kind], fps=2.0)
    assert frames.shape[0] == 2 * SECONDS
    colours = frames.reshape(2 * SECONDS, -1, 3).mean(axis=1)
    np.testing.assert_allclose(colours, np.repeat(PALETTE, 2, axis=0), atol=12)


def test_short_side_resizing_keeps_the_aspect(media: dict[str, Path]) -> None:
    assert decode_frames(media["mp4"], short_side=24).shape == (SECONDS, 24, 32, 3)
    assert decode_frames(media["mp4"], short_side=30).shape == (SECONDS, 30, 40, 3)  # 64 · 30 / 48 = 40
    assert decode_frames(media["mp4"], short_side=H).shape == (SECONDS, H, W, 3)


def test_no_audio_stream_and_no_video_stream(media: dict[str, Path]) -> None:
    with pytest.raises(MediaError, match="no audio stream") as err:
        decode_audio(media["mute"], 16000)
    assert str(err.value).startswith(str(media["mute"]))
    with pytest.raises(MediaError, match="no video stream"):
        decode_frames(media["wav"])


def test_an_empty_audio_stream(tmp_path: Path) -> None:
    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:  # a valid header and no samples
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    with pytest.raises(MediaError, match=r"empty\.wav: the audio stream is empty"):
        decode_audio(tmp_path / "empty.wav", 16000)


@pytest.mark.parametrize("kind", ["wav", "flv", "mp4"])
def test_a_truncated_file_is_an_error_naming_it(media: dict[str, Path], tmp_path: Path, kind: str) -> None:
    data = media[kind].read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) // 2])
    decoders = [lambda: decode_audio(cut, 16000)]
    if kind != "wav":
        decoders.append(lambda: decode_frames(cut))
    for decode in decoders:
        with pytest.raises(MediaError) as err:
            decode()
        assert str(err.value).startswith(f"{cut}: ")
        assert isinstance(err.value, DataError)


@pytest.mark.parametrize("kind", ["wav", "flv", "mp4"])
def test_garbage_and_missing_files(tmp_path: Path, kind: str) -> None:
    junk = tmp_path / f"junk.{kind}"
    junk.write_bytes(b"\x00garbage" * 200)
    with pytest.raises(MediaError, match=r"cannot decode audio \(Invalid data found") as err:
        decode_audio(junk, 16000)
    assert str(err.value).startswith(f"{junk}: ")
    with pytest.raises(MediaError, match="cannot decode video"):
        decode_frames(junk)
    with pytest.raises(MediaError, match="file not found"):
        decode_audio(tmp_path / f"missing.{kind}", 16000)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_image_from_bytes_and_path(tmp_path: Path) -> None:
    image = color_frames(1, 64, 48, seed=3)[0]  # portrait: 48 wide, 64 high
    image[:8, :8] = 0
    png = _encoded(image, "PNG")
    np.testing.assert_array_equal(decode_image(png), image)  # lossless
    (tmp_path / "f.jpg").write_bytes(_encoded(image, "JPEG"))
    from_path = decode_image(tmp_path / "f.jpg")
    assert from_path.shape == (64, 48, 3) and from_path.dtype == np.uint8
    assert np.abs(from_path[20:, 20:].astype(int) - image[20:, 20:]).max() < 8
    assert decode_image(png, short_side=24).shape == (32, 24, 3)
    grey = np.full((10, 12), 77, dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_encoded(grey, "PNG")), np.full((10, 12, 3), 77))


def test_decode_image_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(MediaError) as err:
        decode_image(b"not an image", name="video/abc.hdf5[2]")
    assert str(err.value).startswith("video/abc.hdf5[2]: cannot decode image")
    jpeg = _encoded(color_frames(1, 64, 64, seed=0)[0], "JPEG")
    with pytest.raises(MediaError, match=r"^<bytes>: "):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(MediaError, match="file not found"):
        decode_image(tmp_path / "none.jpg")
