"""Sequence datasets: 1-D signals of shape (1, T) (channels x time), for the GIM audio recipe.

- ``synthetic_audio``: speech-like signals rendered from a seed (always available, for smoke tests and the
  ``audio-gim`` preset). Every speaker has a pitch, a vocal-tract length (formant scale), a spectral tilt and a
  breathiness; every sentence is a fixed sequence of phones from a small inventory, each phone a formant
  envelope (vowels, a nasal: voiced harmonics; fricatives: shaped noise). A take of a sentence by a speaker
  varies the timing, the pitch contour, the harmonic phases and the loudness. label = speaker, instance =
  sentence; sentences 6 and 7 are the test split, so the test asks for speakers saying content never trained on.
- ``wav_folder``: ``<dataset.path>/<speaker or class>/*.wav`` (or ``train/`` and ``test/`` holding such
  folders), mixed to mono, resampled to ``dataset.sample_rate`` and centre-cropped or zero-padded to
  ``dataset.length``. Never downloads.

Signals are float32 in about [-1, 1]; ingest stores them as float16.
"""

from __future__ import annotations

from dataclasses import replace
from math import gcd
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data.base import (CAPS, META_SCHEMA, N_SENTENCES, N_SPEAKERS, N_TAKES, Catalog, Dataset, DatasetCaps,
                                Selection, select)
from pipeline.data.simple import _root, stratified_train_mask
from pipeline.errors import DataError
from schemas.config import DatasetConfig

TEST_SENTENCES = (6, 7)
PHONES_PER_SENTENCE = 6

# The phone inventory: (name, formant centres in Hz, voiced). Vowel formants after Peterson & Barney (1952),
# adult male means; fricatives as noise bands.
PHONES: tuple[tuple[str, tuple[float, ...], bool], ...] = (
    ("a", (730.0, 1090.0, 2440.0), True),
    ("i", (270.0, 2290.0, 3010.0), True),
    ("u", (300.0, 870.0, 2240.0), True),
    ("e", (530.0, 1840.0, 2480.0), True),
    ("o", (570.0, 840.0, 2410.0), True),
    ("m", (250.0, 1200.0, 2300.0), True),
    ("s", (4500.0, 5500.0, 6500.0), False),
    ("sh", (2200.0, 2900.0, 3600.0), False),
)


# ---------------------------------------------------------------- synthetic_audio


def speaker_factors(seed: int) -> dict[str, np.ndarray]:
    """The per-speaker factors of synthetic_audio, each (N_SPEAKERS,): f0 (Hz), formant_scale, tilt_db (per
    octave), breathiness. Pitches are spread evenly over 85..255 Hz (shuffled), so neighbours differ by ~19 Hz."""
    rng = np.random.default_rng([seed, 1])
    f0 = np.linspace(85.0, 255.0, N_SPEAKERS)[rng.permutation(N_SPEAKERS)] * rng.uniform(0.98, 1.02, N_SPEAKERS)
    return {"f0": f0, "formant_scale": rng.uniform(0.85, 1.2, N_SPEAKERS), "tilt_db": rng.uniform(-14.0, -5.0, N_SPEAKERS),
            "breathiness": rng.uniform(0.0, 0.08, N_SPEAKERS)}


def sentence_phones(seed: int) -> np.ndarray:
    """(N_SENTENCES, PHONES_PER_SENTENCE) phone indices; no phone repeats right after itself."""
    rng = np.random.default_rng([seed, 2])
    out = np.empty((N_SENTENCES, PHONES_PER_SENTENCE), dtype=np.int64)
    for s in range(N_SENTENCES):
        out[s, 0] = rng.integers(len(PHONES))
        for j in range(1, PHONES_PER_SENTENCE):
            choice = int(rng.integers(len(PHONES) - 1))  # any phone but the previous one
            out[s, j] = choice + (choice >= out[s, j - 1])
    return out


def synthetic_catalog() -> Catalog:
    """speakers x sentences x takes in that order; sample_id = the row."""
    speaker, sentence, take = (g.reshape(-1).astype(np.int64) for g in np.meshgrid(
        np.arange(N_SPEAKERS), np.arange(N_SENTENCES), np.arange(N_TAKES), indexing="ij"))
    return Catalog(sample_id=np.arange(speaker.shape[0], dtype=np.int64), label=speaker,
                   is_train=~np.isin(sentence, TEST_SENTENCES), instance=sentence, extra={"take": take})


def render_utterance(speaker: int, sentence: int, take: int, *, seed: int, length: int, sample_rate: int) -> np.ndarray:
    """One take: float32 (length,) in [-1, 1], deterministic in its arguments."""
    factors = speaker_factors(seed)
    phones = sentence_phones(seed)[sentence]
    rng = np.random.default_rng([seed, 3, speaker, sentence, take])
    sr, t = float(sample_rate), np.arange(length)
    nyquist = sr / 2

    # Timing: the sentence's phone durations (fixed weights per sentence), jittered per take, filling the signal.
    weights = np.random.default_rng([seed, 4, sentence]).uniform(0.7, 1.3, len(phones)) * rng.uniform(0.8, 1.2, len(phones))
    edges = np.concatenate([[0.0], np.cumsum(weights) / weights.sum() * length])
    ramp = max(1.0, 0.005 * sr)  # 5 ms cross-fades between phones
    rise = np.clip((t[None, :] - edges[:-1, None]) / ramp + 0.5, 0, 1)
    fall = np.clip((edges[1:, None] - t[None, :]) / ramp + 0.5, 0, 1)
    w = rise * fall  # (n_phones, T), sums to ~1 at every t
    w /= np.maximum(w.sum(0, keepdims=True), 1e-6)

    scale = factors["formant_scale"][speaker]

    def envelope(freqs: np.ndarray, phone: int) -> np.ndarray:
        centres = np.minimum(np.asarray(PHONES[phone][1]) * (scale if PHONES[phone][2] else 1.0), 0.95 * nyquist)
        bw = 60.0 + 0.08 * centres
        return sum(1.0 / (1.0 + ((freqs - c) / b) ** 2) for c, b in zip(centres, bw))

    # Voiced source: harmonics of a pitch contour (declination + jitter), amplitudes from tilt x formant envelope.
    f0 = factors["f0"][speaker] * rng.uniform(0.96, 1.04)
    slope = rng.uniform(-0.08, 0.08)
    contour = f0 * (1 + slope * (t / length - 0.5))  # (T,) Hz
    phase = 2 * np.pi * np.cumsum(contour) / sr
    n_harm = int(min(4000.0, 0.9 * nyquist) // (f0 * 1.05))
    h = np.arange(1, n_harm + 1)
    freqs = h * f0
    tilt = 10 ** (factors["tilt_db"][speaker] * np.log2(h) / 20)
    amp = np.stack([tilt * envelope(freqs, p) * (1.0 if PHONES[p][2] else 0.0) for p in phones])  # (n_phones, H)
    harm_amp = amp.T @ w  # (H, T)
    voiced = (harm_amp * np.sin(h[:, None] * phase[None, :] + rng.uniform(0, 2 * np.pi, n_harm)[:, None])).sum(0)

    # Unvoiced phones: white noise shaped by the phone's envelope (in the frequency domain), faded in and out.
    spectrum_f = np.fft.rfftfreq(length, 1 / sr)
    noise = np.zeros(length)
    for j, p in enumerate(phones):
        if not PHONES[p][2]:
            shaped = np.fft.irfft(np.fft.rfft(rng.standard_normal(length)) * envelope(spectrum_f, p), n=length)
            noise += w[j] * shaped / (np.abs(shaped).max() + 1e-9)
    voiced_level = np.abs(voiced).max() + 1e-9
    breath = factors["breathiness"][speaker] * rng.standard_normal(length) * (harm_amp.sum(0) > 0)
    x = voiced / voiced_level + 0.6 * noise + breath
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.4, 0.9) + 0.003 * rng.standard_normal(length)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def load_synthetic_audio(cfg: DatasetConfig) -> Dataset:
    caps = CAPS["synthetic_audio"]
    catalog = synthetic_catalog()
    selection = select(cfg, catalog, caps)
    take = catalog.extra["take"]
    signals = np.stack([render_utterance(int(catalog.label[i]), int(catalog.instance[i]), int(take[i]), seed=cfg.seed,
                                         length=cfg.length, sample_rate=cfg.sample_rate) for i in selection.rows])
    return _dataset(cfg, catalog, selection, signals[:, None], caps)


# ---------------------------------------------------------------- wav_folder


def load_wav_folder(cfg: DatasetConfig) -> Dataset:
    """One subfolder per speaker (or class) holding .wav files; ``train/`` and ``test/`` are used when both exist."""
    root = _root(cfg, "wav_folder", "one subfolder per speaker (or class) holding .wav files (or train/ and test/ with those inside)")

    def folder(path: Path) -> tuple[list[str], list[tuple[Path, int]]]:
        classes = sorted(d.name for d in path.iterdir() if d.is_dir() and any(d.rglob("*.wav")))
        if not classes:
            raise DataError(f"wav_folder {path}: expected one subfolder per speaker holding .wav files, found none",
                            "put the recordings into <dataset.path>/<speaker>/*.wav")
        return classes, [(f, i) for i, c in enumerate(classes) for f in sorted((path / c).rglob("*.wav"))]

    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, train = folder(root / "train")
        test_classes, test = folder(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(f"wav_folder {root / 'test'}: expected only the speakers of {root / 'train'}, found also {unknown}",
                            "give test/ the same speaker subfolders as train/")
        samples = train + [(p, classes.index(test_classes[y])) for p, y in test]
        is_train = np.arange(len(samples)) < len(train)
        labels = np.array([y for _, y in samples], dtype=np.int64)
    else:
        classes, samples = folder(root)
        labels = np.array([y for _, y in samples], dtype=np.int64)
        is_train = stratified_train_mask(labels, cfg.seed)
    caps = replace(CAPS["wav_folder"], num_classes=len(classes), class_names=list(classes))
    catalog = Catalog(sample_id=np.arange(len(samples), dtype=np.int64), label=labels, is_train=is_train)
    selection = select(cfg, catalog, caps)
    signals = np.stack([read_wav(samples[i][0], cfg.sample_rate, cfg.length) for i in selection.rows])
    return _dataset(cfg, catalog, selection, signals[:, None], caps)


def read_wav(path: Path, sample_rate: int, length: int) -> np.ndarray:
    """float32 (length,): mono, resampled to ``sample_rate`` (polyphase), centre-cropped or zero-padded."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    try:
        rate, data = wavfile.read(str(path))
    except (ValueError, OSError) as exc:
        raise DataError(f"wav_folder: cannot read {path} as a WAV file ({exc})",
                        "convert it to PCM or float WAV (e.g. `ffmpeg -i in -ar 16000 out.wav`), or remove it") from exc
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        x = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    else:
        x = data.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)  # (frames, channels) -> mono
    if x.size == 0:
        raise DataError(f"wav_folder: {path} holds no samples", "remove the empty file")
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        x = resample_poly(x, sample_rate // g, rate // g).astype(np.float32)
    if len(x) >= length:
        start = (len(x) - length) // 2
        return np.ascontiguousarray(x[start:start + length])
    out = np.zeros(length, dtype=np.float32)
    start = (length - len(x)) // 2
    out[start:start + len(x)] = x
    return out


# ---------------------------------------------------------------- shared


def _dataset(cfg: DatasetConfig, catalog: Catalog, selection: Selection, signals: np.ndarray, caps: DatasetCaps) -> Dataset:
    """The Dataset of the selected rows: signals float32 (N, 1, T), metadata without pose columns."""
    rows = selection.rows
    n = rows.shape[0]
    instance = pa.array(catalog.instance[rows], type=pa.int64()) if catalog.instance is not None else pa.nulls(n, pa.int64())
    meta = pa.table(
        [
            pa.array(catalog.sample_id[rows], type=pa.int64()),
            pa.array(np.where(selection.is_train, "train", "test"), type=pa.string()),
            pa.array(catalog.label[rows], type=pa.int64()),
            instance,
            pa.nulls(n, pa.float32()),
            pa.nulls(n, pa.float32()),
            pa.nulls(n, pa.int64()),
        ],
        schema=META_SCHEMA,
    )
    caps = replace(caps, class_names=None if caps.class_names is None else list(caps.class_names))
    return Dataset(name=cfg.kind, images=np.ascontiguousarray(signals, dtype=np.float32), meta=meta, caps=caps)
