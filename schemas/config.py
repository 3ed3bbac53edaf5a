"""The run configuration: every key a user can write in YAML or address with ``--set``.

Pydantic models only (no logic beyond validation). ``extra="forbid"`` everywhere
so a misspelt key is an error that names its path.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator

from schemas.feed import FeedConfig
from schemas.objectives import (  # noqa: F401 - re-exported: the objective models are part of the config schema
    AET, CPCAR, DIM, SFA, Autoencoder, InfoNCEGrid, InfoNCEPair, MoCo, Objective, PairingKind, Strict, SupervisedLocal,
    VInfoNCE)


DatasetKind = Literal["synthetic_norb", "smallnorb", "digits", "image_folder", "cifar10", "stl10", "synthetic_audio", "wav_folder"]


class DatasetConfig(Strict):
    kind: DatasetKind = Field("synthetic_norb", description="Which dataset adapter to use.")
    path: str | None = Field(
        None, description="Directory holding the dataset files (smallnorb, image_folder, cifar10, stl10). Never downloaded."
    )
    image_size: int = Field(32, ge=4, le=512, description="Images are resized to image_size x image_size pixels.")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB (datasets that only have gray are repeated).")
    categories: list[int] | None = Field(None, description="Subset of class labels to keep (null = all).")
    instances: list[int] | None = Field(None, description="Subset of object instances to keep (NORB-like datasets; null = all).")
    split: Literal["instances", "lighting"] = Field(
        "instances",
        description="'instances': the dataset's own train/test split (small-NORB: train instances 4,6,7,8,9, test 0,1,2,3,5); "
        "'lighting': train on lightings 0,2,4 and test on 1,3,5.",
    )
    azimuths: list[int] | None = Field(None, description="Subset of azimuth indices 0..17 (20 degree steps) to keep; null = all.")
    elevations: list[int] | None = Field(None, description="Subset of elevation indices 0..8 (30 + 5*i degrees) to keep; null = all.")
    lightings: list[int] | None = Field(None, description="Subset of lighting indices 0..5 to keep; null = all.")
    max_per_split: int | None = Field(None, ge=1, description="Keep at most this many samples per split (a deterministic subset).")
    length: int = Field(
        4096, ge=16, le=1_000_000, description="Sequence datasets (synthetic_audio, wav_folder): samples per signal T; "
        "each sample is (1, T). Longer recordings are centre-cropped, shorter ones zero-padded.")
    sample_rate: int = Field(
        16000, ge=1000, le=192_000, description="Sequence datasets: the rate (Hz) signals are rendered at or resampled to.")
    seed: int = Field(0, description="Seed of the procedural renderer and of subset choices.")
    cache_dir: str | None = Field(
        None, description="Where rendered synthetic data is cached (default: ~/.cache/isostack or $ISOSTACK_CACHE)."
    )


# ---------------------------------------------------------------- layers


class ConvLayer(Strict):
    type: Literal["conv"] = "conv"
    channels: int = Field(..., ge=1, description="Output channels.")
    kernel: int = Field(5, ge=1, description="Kernel size (the seed thesis uses 5x5).")
    stride: int = Field(1, ge=1, description="Stride.")
    padding: int | Literal["same"] = Field("same", description="Zero padding in pixels, or 'same' (kernel // 2).")
    activation: Literal["relu", "none"] = Field("relu", description="Non-linearity after the convolution.")


class PoolLayer(Strict):
    type: Literal["maxpool", "avgpool"] = Field(..., description="Max or average pooling.")
    kernel: int = Field(2, ge=1, description="Window size.")
    stride: int | None = Field(None, description="Stride (default: the window size).")


class GlobalPoolLayer(Strict):
    type: Literal["global_pool"] = "global_pool"
    mode: Literal["avg", "max"] = Field("avg", description="Pool every spatial position into one vector per sample.")


class FlattenLayer(Strict):
    type: Literal["flatten"] = "flatten"


class LinearLayer(Strict):
    type: Literal["linear"] = "linear"
    features: int = Field(..., ge=1, description="Output features (e.g. 3 for a 3-D pose embedding).")
    activation: Literal["relu", "none"] = Field("none", description="Non-linearity after the layer.")


class ResNetStage(Strict):
    type: Literal["resnet_stage"] = "resnet_stage"
    block: Literal["basic", "bottleneck"] = Field("bottleneck", description="Pre-activation block type, no batch norm (as in GIM).")
    channels: int = Field(..., ge=1, description="Width of the stage (bottleneck output is 4x this).")
    blocks: int = Field(..., ge=1, description="Number of residual blocks.")
    stride: int = Field(1, ge=1, description="Stride of the first block.")


class StemLayer(Strict):
    type: Literal["stem"] = "stem"
    channels: int = Field(64, ge=1, description="Output channels of the 3x3 stem convolution of a pre-activation ResNet.")


class Conv1dLayer(Strict):
    type: Literal["conv1d"] = "conv1d"
    channels: int = Field(..., ge=1, description="Output channels.")
    kernel: int = Field(3, ge=1, description="Kernel size in time steps (GIM audio: 10, 8, 4, 4, 4).")
    stride: int = Field(1, ge=1, description="Stride in time steps (GIM audio: 5, 4, 2, 2, 2).")
    padding: int | Literal["same"] = Field("same", description="Zero padding in time steps, or 'same' (kernel // 2).")
    activation: Literal["relu", "none"] = Field("relu", description="Non-linearity after the convolution.")


class GRULayer(Strict):
    type: Literal["gru"] = "gru"
    hidden: int = Field(256, ge=1, description="Hidden size; the layer outputs every step's state, (hidden, T) "
                        "(GIM/CPC audio: 256).")
    layers: int = Field(1, ge=1, description="Stacked GRU layers.")


Layer = Annotated[
    Union[ConvLayer, PoolLayer, GlobalPoolLayer, FlattenLayer, LinearLayer, ResNetStage, StemLayer, Conv1dLayer, GRULayer],
    Field(discriminator="type"),
]


# ---------------------------------------------------------------- training


class TrainConfig(Strict):
    epochs: int = Field(4, ge=1, description="Epochs per module: the whole budget; settle epochs and epochs following new upstream "
                        "versions happen within it (workers/epochs.py).")
    batch_size: int = Field(64, ge=2, description="Samples per step.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    seed: int = Field(0, description="Seed of weights, pairing and shuffling.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on optimizer steps per epoch (null = a full pass).")
    micro_batch: int | None = Field(
        None, ge=1, description="Run the module's forward and backward on at most this many samples at a time (pairs "
        "count as two); the loss still sees the whole batch and the gradients are the whole batch's (pipeline/nn/step.py: "
        "one more forward a step, one micro-batch of activations held). null: the whole batch, or on CPU, where a "
        "batch's step would exceed half of the module's memory budget, the largest micro-batch under it.")


class TrainOverrides(Strict):
    epochs: int | None = Field(None, ge=1, description="Overrides train.epochs for this module.")
    batch_size: int | None = Field(None, ge=2, description="Overrides train.batch_size for this module.")
    lr: float | None = Field(None, gt=0, description="Overrides train.lr for this module.")
    weight_decay: float | None = Field(None, ge=0, description="Overrides train.weight_decay for this module.")
    seed: int | None = Field(None, description="Overrides train.seed for this module.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Overrides train.max_steps_per_epoch for this module.")
    micro_batch: int | None = Field(None, ge=1, description="Overrides train.micro_batch for this module.")


class PatchConfig(Strict):
    size: int = Field(16, ge=2, description="Patch side in pixels.")
    stride: int = Field(8, ge=1, description="Step between patches (16 with stride 8 on 64x64 gives the 7x7 GIM grid).")


class NormalizeConfig(Strict):
    mode: Literal["local", "image"] = Field(
        "local", description="Contrast normalisation of each input, no weights. local: subtract a Gaussian-weighted mean "
        "of the window around each pixel (over all channels) and divide by the window's standard deviation, floored at "
        "its mean over the image (local contrast normalisation, Jarrett et al. 2009, for NORB); needs images or maps. "
        "image: subtract each input's mean and divide by its standard deviation; any input.")
    kernel: int | float = Field(
        9, description="local: the window's side: pixels (an odd whole number, at least 3), or a number between 0 and 1, "
        "that fraction of the input's shorter side, rounded to the nearest odd pixel count (so the window scales with "
        "dataset.image_size); the Gaussian's sigma is (pixels - 1) / 4.")

    @field_validator("kernel")
    @classmethod
    def _window(cls, kernel: int | float) -> int | float:
        if isinstance(kernel, int) and kernel < 3:
            raise ValueError("too small a window: give at least 3 pixels, or a fraction of the image's side such as 0.7")
        if isinstance(kernel, float) and not 0 < kernel < 1:
            raise ValueError("not a window: give whole pixels (an odd integer such as 9) or a fraction of the image's "
                             "side between 0 and 1 (such as 0.7)")
        return kernel


class StageStoreConfig(Strict):
    codec: Literal["float16", "bfloat16", "float32", "int8"] | None = Field(
        None, description="How this module's activations are stored (null = store.codec). int8: per-channel affine "
        "quantization, scale and zero point stored with the shard, error bound checked on write.")
    zstd_level: int | None = Field(
        None, ge=1, le=22, description="Compress this module's activation column with zstd at this level (null = none).")
    materialize: bool = Field(
        True, description="false: publish only this module's frozen weights; the module above recomputes its input "
        "from the nearest materialized stage below (trades compute for store bytes).")


class ModuleConfig(Strict):
    layers: list[Layer] = Field(..., min_length=1, description="The module's layers, applied in order.")
    objective: Objective = Field(default_factory=InfoNCEPair, description="The module's local loss.")
    train: TrainOverrides = Field(default_factory=TrainOverrides, description="Per-module overrides of the train defaults.")
    normalize: NormalizeConfig | None = Field(
        None, description="Normalise the module's input before its layers (and before cutting patches): lighting then "
        "need not be learned away. null: the input as it comes.")
    patches: PatchConfig | None = Field(
        None, description="First module only: cut each image into a grid of overlapping patches, each encoded separately (GIM)."
    )
    store: StageStoreConfig = Field(default_factory=StageStoreConfig,
                                    description="What crosses the boundary above this module: codec, compression, materialization.")


class ScheduleConfig(Strict):
    mode: Literal["async", "sequential"] = Field("async", description="async: all modules at once; sequential: greedy, one after another.")
    publish_every: int | None = Field(
        None, ge=1, description="Commit a new version of a module's activations every N epochs. null: every epoch, or "
        "for a wide module (a version over 512 MiB) about 10 times over its epochs, and for the top module (no module "
        "trains on it) only its final version; a number set here wins.")
    publish_fraction: float | None = Field(
        None, gt=0, le=1, description="Intermediate versions cover this random fraction of the train samples (they "
        "never hold the test split; final versions cover all samples). null: 1.0, or for a wide module (a version "
        "over 512 MiB) 512 MiB worth of rows, at least 0.1; a number set here wins. An intermediate version still "
        "holds at least 4 batches of rows (or every train row).")
    settle_epochs: int = Field(1, ge=0, description="The last N of train.epochs are trained on the upstream's final version (a module waits for "
        "it); with 0 the final version is still computed on the upstream's final version.")
    track_upstream: bool = Field(
        False, description="true: spend at most one epoch on each non-final upstream version (a module waits for the "
        "next one instead of training again on the same input); false: train every epoch on the newest committed "
        "version, so no device idles while the module below publishes rarely (thin intermediate versions). Either "
        "way the epochs stay within train.epochs and the last settle_epochs wait for the upstream's final version.")
    poll_seconds: float = Field(0.5, gt=0, description="How often a waiting module looks for a new upstream version.")
    keep_versions: int = Field(3, ge=1, description="Retention: newest N versions per stage kept (plus final and pinned ones).")
    park_seconds: float | None = Field(
        60.0, ge=0, description="Where the modules share one machine's cores (CPU actors whose threads exceed them), "
        "a module that has trained an epoch and must wait for its upstream's next version ends its actor when that "
        "wait is expected to last this long (from the upstream's epoch times); the driver creates it again, resuming "
        "from that epoch's checkpoint, when the upstream commits a version it can train on. null: never (async, "
        "publish=full only).")
    publish: Literal["full", "stream"] = Field(
        "full", description="full: intermediate versions cover the samples (publish_fraction); stream: a module appends "
        "shards continuously to a bounded ring (store.window_samples) that the module above samples from. Final versions "
        "are complete either way.")


class ResourcesConfig(Strict):
    gpus_per_module: float | Literal["auto"] = Field(
        "auto", description="GPUs per module actor (fractions allowed); 'auto' = 1 when the cluster has GPUs, else 0."
    )
    cpus_per_module: int = Field(1, ge=1, description="CPUs (torch threads) per module actor.")
    placement: Literal["none", "spread", "pack"] = Field("none", description="Placement group strategy for the module actors.")
    max_restarts: int = Field(3, ge=0, description="How often Ray restarts a crashed module actor (it resumes from its checkpoint).")
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS or a new local instance.")
    device_memory_gb: float | None = Field(
        None, gt=0, description="Memory of each module's device, used to refuse recompute chains "
        "(stack.<m>.store.materialize: false) that would not fit; null = this machine's GPU, else its RAM.")
    memory_per_module: float | None = Field(
        None, gt=0, description="Host memory (GB) one module actor may use; validate refuses a config whose predicted "
        "peak (buffer, readahead, model, optimizer, batch activations) is larger. null = this machine's memory divided "
        "by the modules of the stack.")


class EvaluateConfig(Strict):
    per_module: bool = Field(False, description="Also evaluate every module's final activations (accuracy by depth).")
    knn_k: int = Field(5, ge=1, description="Neighbours for the kNN classifier and kNN pose regression.")
    knn_metric: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="How the kNN classifier and kNN pose regression find neighbours: 'euclidean', or "
        "'cosine' (every row scaled to unit length first), the geometry a cosine-scored contrastive loss "
        "(infonce_pair) trains, where a row's length is whatever training left it.")
    pose_projection: Literal["auto", "spectral", "pca"] = Field(
        "auto", description="How plots/pose.png and pose.parquet's x, y, z show an embedding wider than 3: 'spectral' "
        "(Laplacian eigenmaps of the test points' 10-nearest-neighbour graph, no labels used: one object's pose ring "
        "curled through many dimensions comes out a ring; PCA where the graph falls apart into pieces), 'pca' (a linear "
        "view) or 'auto': spectral when the test split is one object, PCA for several (the graph then splits by object).")
    linear_probe_epochs: int = Field(100, ge=1, description="Iterations of the logistic-regression probe.")
    baselines: bool = Field(True, description="Also score raw pixels as the baseline row.")
    fit_rows: int = Field(
        20000, ge=2, description="Most rows of a split the linear probe and kNN are fit on (train) and k-means and the "
        "Gaussian mixture cluster (test): a larger split is subsampled, seeded by train.seed, so their cost stays bounded "
        "at any dataset size; summary.json (evaluation.subsample) and the report say so. Nearest centroid and "
        "evaluate.standardize's statistics use every row, and the probe and kNN are scored on every test row.")
    standardize: bool = Field(
        False, description="Z-score each embedding dimension with the train split's mean and std before scoring (the "
        "raw baseline too). Off: the seed thesis's protocol, where nearest centroid's Euclidean distance follows the "
        "highest-variance dimensions.")


class ExportConfig(Strict):
    plots: bool = Field(True, description="Write PNG plots.")
    report: bool = Field(True, description="Write report.html.")
    model: bool = Field(True, description="Write the composed encoder to model/.")


class StoreConfig(Strict):
    uri: str = Field("./isostack-runs", description="Store root: a local path or an s3://, gs://, hdfs:// URI.")
    codec: Literal["float16", "bfloat16", "float32", "int8"] = Field(
        "float16", description="How activation tensors are stored (each module may override it: stack.<m>.store.codec).")
    rows_per_shard: int = Field(4096, ge=1, description="Rows per Parquet shard.")
    window_samples: int = Field(
        16384, ge=1, description="schedule.publish=stream: samples kept in each module's ring of streamed shards.")
    max_shard_reuse: int = Field(
        4, ge=1, description="schedule.publish=stream: how many epochs' worth of draws one streamed shard may feed.")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        problem = uri_credentials_problem(uri)
        if problem:
            raise ValueError(problem)
        return uri


_SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token", "token", "credentials")


def uri_credentials_problem(uri: str) -> str | None:
    """Why ``uri`` must not be used as a store URI (it carries credentials), or None.

    The store URI is written into run.json, logs and the report; credentials belong in the
    environment (AWS_ACCESS_KEY_ID, ...) or the file system's own configuration.
    """
    from urllib.parse import parse_qs, urlsplit

    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    secret = sorted(k for k in parse_qs(parts.query) if k.lower() in _SECRET_QUERY_KEYS)
    # Any user-info part is refused: s3://AKIA...@bucket would be taken as an access key, and a user name is
    # as much a credential to log as a password (hdfs takes its user from HADOOP_USER_NAME instead).
    if "@" in parts.netloc or secret:
        what = "a user-info part (...@)" if "@" in parts.netloc else "?" + "&".join(f"{k}=" for k in secret)
        return (f"the store URI carries credentials ({what}); they would be written into run.json, logs and the report. "
                "Remove them and set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "GOOGLE_APPLICATION_CREDENTIALS, HADOOP_USER_NAME) or the file system's own configuration")
    return None


class RunConfig(Strict):
    name: str = Field("run", description="A label for the run (the run id defaults to name + timestamp).")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="What data to train on.")
    stack: dict[str, ModuleConfig] = Field(..., min_length=1, description="The modules, bottom to top, by name.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training defaults for every module.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="How modules are scheduled and publish.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="What each module actor asks Ray for.")
    feed: FeedConfig = Field(default_factory=FeedConfig, description="How trainers stream their upstream version.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="The final stage's classifiers.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="What the final stage writes.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Where activations, checkpoints and results go.")

    @field_validator("stack")
    @classmethod
    def _names_are_identifiers(cls, stack: dict[str, ModuleConfig]) -> dict[str, ModuleConfig]:
        for name in stack:
            if not name.replace("_", "").replace("-", "").isalnum() or name in {"input", "model"}:
                raise ValueError(f"module name {name!r} must be letters, digits, '_' or '-', and not 'input' or 'model'")
        return stack

    def module_codec(self, name: str) -> str:
        """The codec a module's activations are stored with (``stack.<m>.store.codec``, else ``store.codec``)."""
        return self.stack[name].store.codec or self.store.codec

    def module_train(self, name: str) -> TrainConfig:
        """The effective train settings of one module (defaults + its overrides)."""
        overrides = self.stack[name].train.model_dump(exclude_none=True)
        return self.train.model_copy(update=overrides)
