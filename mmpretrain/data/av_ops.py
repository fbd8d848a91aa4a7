"""Video and audio data ops (registered in ``DATA_OPS``), for the same webdataset pipeline as images.

    decode_video  ``mp4``/``webm``/``avi``/``mkv`` member -> ``"video"`` (T, 3, H, W) float, normalised,
                  and ``"video_mask"`` (T,) bool, **True = a real frame** (short clips are padded);
                  T frames at ``fps`` (uniform from a random start in training, from the centre at
                  evaluation), short side resized, random / centre crop; decord. At evaluation,
                  ``clips`` x ``crops`` views -> (V, T, 3, H, W) (the evaluator averages them).
    decode_audio  ``wav``/``flac``/``mp3``/``ogg`` member, or the audio track of the video member ->
                  ``"audio"`` (S,) mono float at ``sample_rate`` and ``"audio_mask"`` (S,) bool, True =
                  real audio; a random window in training, the centre one (or ``windows`` evenly
                  spread ones -> (V, S)) at evaluation; PyAV decodes, torchaudio resamples.
Frames, fps, size and normalisation / sample rate and length default to the model's video / audio
tower (``OpContext.spec("video")`` / ``("audio")``), so a config need not repeat them.

Bad input (unreadable or truncated media, no audio track, zero-length audio, absurd resolutions)
raises ``SampleError`` and is skipped and counted by the stream; with ``optional: true`` the sample
is kept instead, with zeros and ``"<m>_valid"`` False, so the loss pairs using that modality
ignore it (counted as ``absent_<m>``). Decoding has a wall-clock limit
per sample (``timeout_s``), enforced with a timer signal where the pipeline runs in a process's
main thread (DataLoader workers, single-process loading).
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchaudio
from torchvision.transforms.v2 import functional as TF

from mmpretrain.data.ops import DATA_OPS, Op, OpContext, OpExample, Sample, SampleError, aspect_capped
from mmpretrain.types import valid_key

VIDEO_KEYS = ("mp4", "webm", "avi", "mkv", "mov")
AUDIO_KEYS = ("wav", "flac", "mp3", "ogg")


class DecodeTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``DecodeTimeout`` after ``seconds`` (only in the main thread; elsewhere no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise DecodeTimeout(f"decoding took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass(frozen=True)
class DecodeVideoParams:
    frames: int | None = None  # None: the video tower's (``input_spec``)
    fps: float | None = None  # sampling rate of the T frames (clips are resampled to it); None: the tower's
    size: int | None = None  # crop side; None: the video tower's input size
    train: bool = True  # random start and crop; False: deterministic views (evaluation)
    clips: int = 1  # evaluation: clips spread evenly over the video (multi-clip)
    crops: int = 1  # evaluation: 1 = centre; 3 = left/centre/right (or top/centre/bottom) crops
    optional: bool = False  # a sample without usable video is kept, with zeros and video_valid=False
    keys: tuple[str, ...] = VIDEO_KEYS
    max_pixels: int = 4096 * 2160  # refuse absurd resolutions
    timeout_s: float = 10.0


def _member(s: Sample, keys: tuple[str, ...], kind: str) -> tuple[str, bytes]:
    key = next((k for k in keys if k in s), None)
    if key is None:
        raise SampleError(f"missing_{kind}", f"{s.get('__key__')}: no {kind} member among {keys}")
    if not s[key]:
        raise SampleError(f"bad_{kind}", f"{s.get('__key__')}: empty {key} member")
    return key, s[key]


def frame_indices(n_frames: int, native_fps: float, frames: int, fps: float, start_fraction: float) -> np.ndarray:
    """Indices of ``frames`` frames ``1/fps`` s apart, starting ``start_fraction`` of the way into
    the slack; indices past the end are -1 (padding)."""
    step = max(native_fps / fps, 1e-6)
    span = step * (frames - 1)
    start = max(0.0, n_frames - 1 - span) * start_fraction
    idx = np.round(start + step * np.arange(frames)).astype(int)
    return np.where(idx < n_frames, idx, -1)


def view_fractions(n: int) -> list[float]:
    """``n`` evenly spread positions in [0, 1]: 1 -> [0.5], 3 -> [0, 0.5, 1] (clip starts, crop offsets)."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def _optional(p_optional: bool, modality: str, fill: Callable[[], Sample], op: Op) -> Op:
    """Wrap a decode op: with ``optional``, a sample it cannot decode gets ``fill()`` and ``<m>_valid=False``
    (counted as ``absent_<m>``) instead of being skipped."""
    if not p_optional:
        return op

    def wrapped(s: Sample) -> Sample:
        try:
            s = op(s)
            s[valid_key(modality)] = torch.tensor(True)
        except SampleError:
            s.update(fill())
            s[valid_key(modality)] = torch.tensor(False)
            s.setdefault("__absent__", []).append(modality)  # the stream counts it as absent_<modality>
        return s

    return wrapped


def _video_spec(p: DecodeVideoParams, ctx: OpContext) -> tuple[int, float, int, tuple, tuple]:
    spec = ctx.spec("video")
    frames, fps = p.frames or (spec and spec.frames), p.fps or (spec and spec.fps)
    size = p.size or (spec.size if spec else ctx.image.size[0])
    if not frames or not fps:
        raise ValueError("decode_video needs frames and fps: set them in its params or give the model a video tower")
    if p.train and p.clips * p.crops > 1:
        raise ValueError("decode_video: clips/crops > 1 are evaluation views; set train: false")
    mean, std = (spec.mean, spec.std) if spec else (ctx.image.mean, ctx.image.std)
    return int(frames), float(fps), int(size), tuple(mean), tuple(std)


@DATA_OPS.register(
    "decode_video",
    config=DecodeVideoParams,
    example=OpExample(
        ("mp4",),
        params={"frames": 4, "fps": 4, "size": 32},
        produce=("video", "video_mask"),
        corrupt=(b"\x00garbage", "bad_video"),
    ),
)
def decode_video(p: DecodeVideoParams, ctx: OpContext) -> Op:
    """Decode T frames with decord -> ``video`` (T, 3, H, W) normalised + ``video_mask`` (T,); with
    ``clips * crops = V > 1`` views (evaluation) -> ``video`` (V, T, 3, H, W) + ``video_mask`` (V, T)."""
    frames, fps, size, mean, std = _video_spec(p, ctx)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    views = p.clips * p.crops

    def op(s: Sample) -> Sample:
        import decord

        key, data = _member(s, p.keys, "video")
        try:
            with time_limit(p.timeout_s):
                w, h = video_size(data)  # from the header: nothing decoded yet
                if h * w > p.max_pixels or min(h, w) < 8:
                    raise SampleError("bad_video", f"{s.get('__key__')}: {w}x{h} video")
                # decord's own resize (width=, height=) fails on some sizes (its batch copy checks the
                # unscaled size: 64 px -> 48 px raises), so frames are resized after decoding
                vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
                if not len(vr):
                    raise SampleError("bad_video", f"{s.get('__key__')}: no frames")
                starts = [float(torch.rand(()))] if p.train else view_fractions(p.clips)
                idx = [frame_indices(len(vr), vr.get_avg_fps() or 25.0, frames, fps, f) for f in starts]
                flat = np.maximum(np.concatenate(idx), 0).tolist()
                raw = torch.from_numpy(vr.get_batch(flat).asnumpy())  # (clips*T, H, W, 3)
        except SampleError:
            raise
        except (DecodeTimeout, Exception) as exc:  # decord raises DECORDError and others on corrupt data
            raise SampleError("bad_video", f"{s.get('__key__')}: cannot decode {key}: {exc}") from None
        x = _resize(raw.permute(0, 3, 1, 2), size).float().div_(255)
        crops = [_crop(x, size, None if p.train else f) for f in view_fractions(p.crops)]
        clips = [c.view(p.clips, frames, 3, size, size) for c in crops]  # per crop: (clips, T, 3, S, S)
        video = torch.stack(clips, 1).flatten(0, 1)  # (V, T, 3, S, S), clip-major
        mask = torch.from_numpy(np.stack(idx) >= 0).repeat_interleave(p.crops, 0)  # (V, T)
        video = (video - mean_t) / std_t * mask[..., None, None, None]
        s["video"], s["video_mask"] = (video, mask) if views > 1 else (video[0], mask[0])
        return s

    fill = lambda: {"video": torch.zeros(frames, 3, size, size), "video_mask": torch.zeros(frames, dtype=torch.bool)}  # noqa: E731
    return _optional(p.optional, "video", fill, op)


def video_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the first video stream, read from the container header by PyAV (decoding
    a frame to learn it, as ``VideoReader[0]`` would, cost a third of a clip's decode)."""

    with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise SampleError("bad_video", "no video stream")
        ctx = container.streams.video[0].codec_context
        return int(ctx.width or 0), int(ctx.height or 0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> short side ``size`` (antialiased), the long side first cut (centred) to
    ``MAX_RESIZE_ASPECT`` times the short one: a 8 x 5,000,000 video resized whole is a resize bomb."""

    return TF.resize(aspect_capped(x), size, antialias=True)


def _crop(x: torch.Tensor, size: int, fraction: float | None) -> torch.Tensor:
    """A ``size`` square of (N, 3, H, W): at ``fraction`` along the long side (0 left/top, 0.5 centre,
    1 right/bottom), or random when ``fraction`` is None; the same window for all N frames."""
    h, w = x.shape[-2:]
    frac_y, frac_x = (
        (float(torch.rand(())), float(torch.rand(())))
        if fraction is None
        else (fraction if h > w else 0.5, fraction if w >= h else 0.5)
    )
    top, left = round((h - size) * frac_y), round((w - size) * frac_x)
    return x[..., top : top + size, left : left + size]


@dataclass(frozen=True)
class DecodeAudioParams:
    sample_rate: int | None = None  # None: the audio tower's (``input_spec``)
    seconds: float | None = None  # window length; None: the audio tower's
    train: bool = True  # a random window; False: deterministic windows (evaluation)
    windows: int = 1  # evaluation: windows spread evenly over the audio (averaged by the evaluator)
    optional: bool = False  # a sample without usable audio is kept, with zeros and audio_valid=False
    keys: tuple[str, ...] = AUDIO_KEYS + VIDEO_KEYS  # a video member's audio track is used when no audio member
    min_seconds: float = 0.05  # shorter audio is refused (zero-length, clicks)
    max_seconds: float = 600.0  # longer audio is refused: from the header, and counted while decoding
    max_channels: int = 8
    timeout_s: float = 10.0


def read_audio(data: bytes, sample_rate: int, *, max_seconds: float = 600.0, max_channels: int = 8) -> torch.Tensor:
    """The first audio stream of a media file as mono float32 (S,) at ``sample_rate``: PyAV decodes
    (3.6x faster here than decord's AudioReader: benchmarks/decode.py), torchaudio resamples. Audio
    longer than ``max_seconds`` or with more than ``max_channels`` channels is refused from its header,
    and the samples are counted as they decode (a header may lie); channels are averaged per frame,
    so memory holds the mono signal only."""

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate, channels = stream.rate or 0, stream.codec_context.channels or 0
        if not 0 < channels <= max_channels or rate <= 0:
            raise ValueError(f"{channels} channels at {rate} Hz (at most {max_channels} channels)")
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
        if declared > max_seconds or (container.duration or 0) / 1e6 > max_seconds:
            raise ValueError(
                f"{max(declared, (container.duration or 0) / 1e6):.0f} s of audio (at most {max_seconds:g})"
            )
        chunks, total, limit = [], 0, int(max_seconds * rate) + rate
        for frame in container.decode(stream):
            raw, n = frame.to_ndarray(), len(frame.layout.channels)  # planar: (C, S); packed: (1, S * C) interleaved
            samples = (
                (raw.reshape(n, -1) if frame.format.is_planar else raw.reshape(-1, n).T).astype(np.float32).mean(0)
            )
            total += samples.size
            if total > limit:
                raise ValueError(f"more than {max_seconds:g} s of audio")
            chunks.append(samples)
        fmt = stream.format.name
    if not chunks:
        raise ValueError("no audio frames")
    wave = torch.from_numpy(np.concatenate(chunks))
    if fmt.startswith("s16"):
        wave = wave / 32768.0
    elif fmt.startswith("s32"):
        wave = wave / 2147483648.0
    return torchaudio.functional.resample(wave, rate, sample_rate) if rate != sample_rate else wave


@DATA_OPS.register(
    "decode_audio",
    config=DecodeAudioParams,
    example=OpExample(
        ("wav",),
        params={"sample_rate": 8000, "seconds": 0.5},
        produce=("audio", "audio_mask"),
        corrupt=(b"\x00garbage", "bad_audio"),
    ),
)
def decode_audio(p: DecodeAudioParams, ctx: OpContext) -> Op:
    """Decode (PyAV) and resample (torchaudio) mono audio -> ``audio`` (S,) + ``audio_mask`` (S,);
    with ``windows = V > 1`` (evaluation) -> ``audio`` (V, S) + ``audio_mask`` (V, S)."""
    audio = ctx.spec("audio")
    rate = p.sample_rate or (audio and audio.sample_rate)
    seconds = p.seconds or (audio and audio.seconds)
    if not rate or not seconds:
        raise ValueError(
            "decode_audio needs sample_rate and seconds: set them in its params or give the model an audio tower"
        )
    if p.train and p.windows > 1:
        raise ValueError("decode_audio: windows > 1 are evaluation views; set train: false")
    n = int(round(rate * seconds))

    def op(s: Sample) -> Sample:
        key, data = _member(s, p.keys, "audio")
        try:
            with time_limit(p.timeout_s):
                wave = read_audio(data, rate, max_seconds=p.max_seconds, max_channels=p.max_channels)
        except (DecodeTimeout, Exception) as exc:  # no audio track, corrupt data
            raise SampleError("bad_audio", f"{s.get('__key__')}: cannot decode audio of {key}: {exc}") from None
        if wave.numel() < p.min_seconds * rate or not torch.isfinite(wave).all():
            raise SampleError("bad_audio", f"{s.get('__key__')}: {wave.numel()} samples of audio")
        slack = max(0, wave.numel() - n)
        starts = (
            [int(slack * float(torch.rand(())))] if p.train else [round(slack * f) for f in view_fractions(p.windows)]
        )
        audio, mask = torch.zeros(len(starts), n), torch.zeros(len(starts), n, dtype=torch.bool)
        for i, start in enumerate(starts):
            clip = wave[start : start + n]
            audio[i, : clip.numel()], mask[i, : clip.numel()] = clip, True
        s["audio"], s["audio_mask"] = (audio, mask) if p.windows > 1 else (audio[0], mask[0])
        return s

    fill = lambda: {"audio": torch.zeros(n), "audio_mask": torch.zeros(n, dtype=torch.bool)}  # noqa: E731
    return _optional(p.optional, "audio", fill, op)
