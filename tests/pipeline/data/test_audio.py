"""The 1-D sequence path: audio datasets, conv1d / gru layers, infonce_grid on (C, T), temporal pairing, plan checks."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from pipeline.data import capabilities, load_dataset
from pipeline.data.audio import N_SENTENCES, N_TAKES, TEST_SENTENCES, read_wav, render_utterance
from pipeline.errors import ConfigError, DataError
from pipeline.nn.modules import ShapeError, build_module, infer_shape, pool_to_vector
from pipeline.nn.objectives import build_objective
from pipeline.nn.pairing import paired_vectors, partner_index
from pipeline.planning.plan import build_plan
from schemas.config import DatasetConfig, ModuleConfig, RunConfig

GIM_AUDIO = [(10, 5, 2), (8, 4, 2), (4, 2, 2), (4, 2, 2), (4, 2, 1)]  # (kernel, stride, padding) of the official code


def conv1d_layers(channels: int) -> list[dict]:
    return [{"type": "conv1d", "channels": channels, "kernel": k, "stride": s, "padding": p} for k, s, p in GIM_AUDIO]


# ---------------------------------------------------------------- datasets


def test_synthetic_audio_is_deterministic_with_speakers_and_sentences():
    cfg = DatasetConfig(kind="synthetic_audio", categories=[0, 3, 7], length=1024)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.images.shape == (3 * N_SENTENCES * N_TAKES, 1, 1024) and a.images.dtype == np.float32
    np.testing.assert_array_equal(a.images, b.images)
    assert np.abs(a.images).max() <= 1.0 and a.images.std() > 0.05
    meta = a.meta.to_pydict()
    assert sorted(set(meta["label"])) == [0, 3, 7]
    assert all((s == "test") == (i in TEST_SENTENCES) for s, i in zip(meta["split"], meta["instance"]))
    assert set(meta["azimuth"]) == {None} and set(meta["lighting"]) == {None}
    # Another seed renders other speakers; takes of one sentence differ from each other.
    other = load_dataset(DatasetConfig(kind="synthetic_audio", categories=[0, 3, 7], length=1024, seed=1))
    assert not np.allclose(a.images, other.images)
    assert not np.allclose(a.images[0], a.images[1])
    caps = capabilities("synthetic_audio")
    assert caps.sequence and caps.has_instance and not caps.has_pose and caps.num_classes == 10


def test_synthetic_speakers_differ_in_pitch():
    """The speaker factor is audible: the spectral peak of a vowel-heavy take moves with the speaker's f0."""
    def low_peak(speaker):
        x = render_utterance(speaker, 0, 0, seed=0, length=8192, sample_rate=16000)
        spectrum = np.abs(np.fft.rfft(x))
        freqs = np.fft.rfftfreq(len(x), 1 / 16000)
        band = (freqs > 60) & (freqs < 300)
        return freqs[band][spectrum[band].argmax()]

    peaks = [low_peak(s) for s in range(4)]
    assert len({round(p / 10) for p in peaks}) >= 3  # distinct fundamentals


def _write_wav(path, signal: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = {1: 127, 2: 32767}[width]
    ints = np.round(np.clip(signal, -1, 1) * scale).astype({1: np.int16, 2: np.int16}[width])
    if width == 1:
        ints = (ints + 128).astype(np.uint8)
    frames = np.repeat(ints[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())


def test_wav_folder_reads_resamples_and_crops(tmp_path):
    t = np.arange(4000) / 8000
    for speaker, freq in (("alice", 200.0), ("bob", 440.0)):
        for i in range(4):
            _write_wav(tmp_path / speaker / f"{i}.wav", 0.5 * np.sin(2 * np.pi * freq * t), 8000, channels=1 + i % 2)
    _write_wav(tmp_path / "bob" / "short.wav", 0.5 * np.ones(100), 8000, width=1)  # 8-bit, shorter than length
    cfg = DatasetConfig(kind="wav_folder", path=str(tmp_path), length=2000, sample_rate=16000)
    ds = load_dataset(cfg)
    assert ds.images.shape == (9, 1, 2000) and ds.images.dtype == np.float32
    assert ds.caps.class_names == ["alice", "bob"] and ds.caps.num_classes == 2
    meta = ds.meta.to_pydict()
    assert meta["label"].count(0) == 4 and meta["label"].count(1) == 5
    assert {"train", "test"} <= set(meta["split"])
    # 8 kHz -> 16 kHz keeps the 200 Hz tone (the centre crop of 8000 resampled samples), stereo is mixed to mono.
    x = ds.images[0, 0]
    assert abs(np.abs(np.fft.rfft(x)).argmax() * 16000 / len(x) - 200.0) < 10
    assert abs(np.abs(x).max() - 0.5) < 0.02
    short = read_wav(tmp_path / "bob" / "short.wav", 16000, 2000)
    assert short.shape == (2000,) and short[0] == 0 and abs(short[1000] - 0.5) < 0.02  # zero-padded around the centre


def test_wav_folder_errors_name_the_cause(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path"):
        load_dataset(DatasetConfig(kind="wav_folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="one subfolder per speaker"):
        load_dataset(DatasetConfig(kind="wav_folder", path=str(tmp_path / "empty")))
    bad = tmp_path / "bad" / "x" / "broken.wav"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a wav file at all")
    with pytest.raises(DataError, match="cannot read .*broken.wav"):
        read_wav(bad, 16000, 100)


def test_ingest_stores_signals_as_float16(tmp_path):
    from pipeline.run.ingest import ingest
    from pipeline.store import Store

    cfg = DatasetConfig(kind="synthetic_audio", categories=[0, 1], length=512)
    store = Store(str(tmp_path), "r1", create=True)
    manifest = ingest(store, cfg)
    assert manifest.codec == "float16" and manifest.shape == [1, 512]
    reader = store.read("input", manifest.version)
    ds = load_dataset(cfg)
    ds_ids, ids = ds.meta.column("sample_id").to_numpy(), reader.meta.column("sample_id").to_numpy()
    row_of = np.argsort(ds_ids)[np.searchsorted(ds_ids, ids, sorter=np.argsort(ds_ids))]
    assert np.array_equal(ds_ids[row_of], ids)  # each stored row is matched with its sample by id
    np.testing.assert_allclose(reader.tensor().numpy(), ds.images[row_of], atol=1e-3)


# ---------------------------------------------------------------- layers and shapes


def test_gim_audio_encoder_shapes_match_the_paper():
    """20480 samples through the five strided convs give 128 steps (a downsampling of 160), as in GIM/CPC."""
    cfg = ModuleConfig.model_validate({"layers": conv1d_layers(8) + [{"type": "gru", "hidden": 6}]})
    assert infer_shape(cfg, (1, 20480))[0] == (6, 128)
    out_shape, params = infer_shape(cfg, (1, 4096))
    module = build_module(cfg, (1, 4096))
    y = module(torch.randn(3, 1, 4096))
    assert tuple(y.shape[1:]) == out_shape == (6, 26)
    assert params == sum(p.numel() for p in module.parameters())


def test_pooling_on_sequences():
    cfg = ModuleConfig.model_validate({"layers": [{"type": "conv1d", "channels": 4, "kernel": 3}, {"type": "maxpool", "kernel": 2},
                                                  {"type": "avgpool", "kernel": 3, "stride": 1}, {"type": "global_pool"},
                                                  {"type": "linear", "features": 2}]})
    assert infer_shape(cfg, (1, 40))[0] == (2,)
    assert build_module(cfg, (1, 40))(torch.randn(5, 1, 40)).shape == (5, 2)
    assert pool_to_vector(torch.ones(2, 3, 7)).shape == (2, 3)


@pytest.mark.parametrize("layers, shape, message", [
    ([{"type": "conv", "channels": 4}], (1, 64), "conv needs a feature map .* sequence \\(1, 64\\); use conv1d"),
    ([{"type": "conv1d", "channels": 4}], (1, 8, 8), "conv1d needs a sequence \\(C, T\\) but its input is a \\(1, 8, 8\\) map"),
    ([{"type": "gru", "hidden": 4}], (16,), "gru needs a sequence"),
    ([{"type": "conv1d", "channels": 4, "kernel": 9, "padding": 0}], (1, 8), "longer than the 8 steps"),
    ([{"type": "linear", "features": 3}], (4, 10), "linear needs a vector but its input is a \\(4, 10\\) sequence"),
])
def test_sequence_shape_errors(layers, shape, message):
    with pytest.raises(ShapeError, match=message):
        infer_shape(ModuleConfig.model_validate({"layers": layers}), shape)


# ---------------------------------------------------------------- objectives on (C, T)


def _sequences(n=32, t=48, seed=0):
    """Random sums of two sinusoids per sample: the future of each sequence is predictable from its past."""
    g = torch.Generator().manual_seed(seed)
    freq = 0.05 + 0.4 * torch.rand(n, 2, 1, generator=g)
    phase = 2 * torch.pi * torch.rand(n, 2, 1, generator=g)
    time = torch.arange(t, dtype=torch.float32)
    return torch.sin(2 * torch.pi * freq * time + phase).sum(1, keepdim=True)  # (n, 1, t)


def _train(objective: dict, steps=25):
    torch.manual_seed(0)
    x = _sequences()
    cfg = ModuleConfig.model_validate({"layers": [{"type": "conv1d", "channels": 16, "kernel": 4, "stride": 2},
                                                  {"type": "conv1d", "channels": 16, "kernel": 3}],
                                       "objective": objective})
    out_shape, _ = infer_shape(cfg, (1, 48))
    module, obj = build_module(cfg, (1, 48)), build_objective(cfg.objective, out_shape, None)
    opt = torch.optim.Adam([*module.parameters(), *obj.parameters()], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, stats = obj(module(x), None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, stats, obj


def test_infonce_grid_on_a_sequence_predicts_steps_ahead_and_its_loss_falls():
    losses, stats, obj = _train({"kind": "infonce_grid", "pairing": "temporal", "steps": 4, "negatives": 8})
    assert obj.offsets == [1, 2, 3, 4]  # k steps ahead, not shifted like half-overlapping patches
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert 0.0 <= stats["accuracy"] <= 1.0


def test_infonce_grid_skips_steps_past_the_sequence():
    obj = build_objective(ModuleConfig.model_validate(
        {"layers": [{"type": "flatten"}], "objective": {"kind": "infonce_grid", "pairing": "temporal", "steps": 6}}).objective,
        (4, 3), None)
    assert obj.offsets == [1, 2]
    loss, _ = obj(torch.randn(5, 4, 3))
    assert torch.isfinite(loss)
    # A long first-layer output is scored on a random 128-step window (GIM audio's subsampling), with gradients.
    long = build_objective(ModuleConfig.model_validate(
        {"layers": [{"type": "flatten"}], "objective": {"kind": "infonce_grid", "pairing": "temporal", "steps": 1}}).objective,
        (4, 900), None)
    z = torch.randn(3, 4, 900, requires_grad=True)
    long(z)[0].backward()
    touched = (z.grad.abs().sum(dim=(0, 1)) > 0).nonzero().flatten()
    assert 0 < touched.max() - touched.min() <= 128  # 128 contexts and the step each predicts


def test_temporal_pairing_pairs_neighbouring_steps_and_its_loss_falls():
    z = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    a, b = paired_vectors(z, None)
    assert a.shape == b.shape == (2 * 4, 3)
    torch.testing.assert_close(b - a, torch.ones_like(a))  # step t+1 next to step t, same sample
    assert (partner_index("temporal", label=np.zeros(4), rng=np.random.default_rng(0)) == np.arange(4)).all()
    losses, _, obj = _train({"kind": "infonce_pair", "pairing": "temporal", "temperature": 0.2})
    assert not obj.needs_pairs
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3


def test_objective_errors_for_mismatched_pairings():
    def cfg(**objective):
        return ModuleConfig.model_validate({"layers": [{"type": "flatten"}], "objective": objective}).objective

    with pytest.raises(ConfigError, match="set objective.pairing: temporal"):
        build_objective(cfg(kind="infonce_grid"), (8, 20), None)
    with pytest.raises(ConfigError, match="'temporal' pairs time steps of a sequence .* \\(8, 4, 4\\)"):
        build_objective(cfg(kind="infonce_pair", pairing="temporal"), (8, 4, 4), None)
    with pytest.raises(ConfigError, match="use pairing 'temporal' on sequences"):
        build_objective(cfg(kind="sfa", pairing="patch_grid"), (8, 20), None)


# ---------------------------------------------------------------- the plan


def _audio_config(**stack_objectives) -> RunConfig:
    stack = {"m1": {"layers": conv1d_layers(8)[:3], "objective": {"kind": "infonce_grid", "pairing": "temporal"}},
             "m2": {"layers": [{"type": "gru", "hidden": 8}], "objective": {"kind": "infonce_grid", "pairing": "temporal"}}}
    for name, objective in stack_objectives.items():
        stack[name]["objective"] = objective
    return RunConfig.model_validate({"dataset": {"kind": "synthetic_audio", "length": 1024}, "stack": stack})


def test_plan_infers_sequence_shapes():
    plan = build_plan(_audio_config(), local_cluster=False)
    assert plan.input_shape == [1, 1024]
    assert [m.out_shape for m in plan.modules] == [[8, 26], [8, 26]]
    assert plan.modules[1].pairing == "temporal" and plan.rows == 400


def test_plan_reports_mismatched_pairings_with_key_paths():
    cfg = _audio_config(m1={"kind": "infonce_grid", "pairing": "patch_grid"},
                        m2={"kind": "infonce_pair", "pairing": "augment"})
    with pytest.raises(ConfigError) as err:
        build_plan(cfg, local_cluster=False)
    keys = [k for k, _ in err.value.problems]
    text = str(err.value)
    assert "stack.m1.objective.pairing" in keys and "set objective.pairing: temporal" in text
    assert "stack.m2.objective.pairing" in keys and "reads a sequence (8, 26); use 'temporal'" in text
    # Sequence pairings on image data and missing metadata on audio data.
    digits = RunConfig.model_validate({"dataset": {"kind": "digits", "image_size": 8}, "stack": {"m1": {
        "layers": [{"type": "conv", "channels": 4}], "objective": {"kind": "infonce_pair", "pairing": "temporal"}}}})
    with pytest.raises(ConfigError, match="stack.m1.objective.pairing: 'temporal' pairs time steps"):
        build_plan(digits, local_cluster=False)
    pose = _audio_config(m2={"kind": "infonce_pair", "pairing": "neighbor_pose"})
    with pytest.raises(ConfigError, match="needs azimuth and elevation, which dataset 'synthetic_audio' lacks; use 'temporal'"):
        build_plan(pose, local_cluster=False)


def test_the_audio_preset_plans():
    from pipeline.planning.config import load_config

    plan = build_plan(load_config("audio-gim"), local_cluster=False)
    assert plan.input_shape == [1, 4096] and len(plan.modules) == 6
    assert plan.modules[-1].out_shape == [64, 26]
