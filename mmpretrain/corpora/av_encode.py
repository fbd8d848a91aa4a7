"""Writing clips: H.264 (+ AAC) MP4 bytes from frames and a waveform, with PyAV (for corpora and tests)."""

from __future__ import annotations

import io

import av
import numpy as np


def encode_mp4(video: np.ndarray, fps: int, audio: np.ndarray | None, rate: int) -> bytes:
    """H.264 (+ AAC) MP4 bytes with PyAV."""

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "28"}
        astream = c.add_stream("aac", rate=rate) if audio is not None else None
        for img in video:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if astream is not None:
            frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
            frame.sample_rate = rate
            for pkt in astream.encode(frame):
                c.mux(pkt)
            for pkt in astream.encode():
                c.mux(pkt)
    return buf.getvalue()
