"""The ``objective`` section of a module's config: one model per local objective, a union tagged by ``kind``."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PairingKind = Literal["same_instance", "neighbor_pose", "patch_grid", "augment", "temporal"]


class AugmentViews(Strict):
    """The random views of images under pairing ``augment`` (two of each image) or ``pair_views`` (one of each
    row and one of its partner): ``pipeline.nn.pairing.loss_inputs``."""

    flip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip in each view (0 where a mirror "
                        "image is another thing, as for digits and letters).")
    min_scale: float = Field(0.5, gt=0, le=1, description="Smallest side of the random resized crop, as a fraction of "
                             "the image's side; 1 = no crop (the whole image).")
    jitter: float = Field(0.3, ge=0, lt=1, description="Contrast jitter +-jitter (brightness +-jitter/2).")


class _ObjectiveBase(Strict):
    pairing: PairingKind = Field("same_instance", description="Where the positive x+ of each sample comes from.")
    augment: AugmentViews = Field(default_factory=AugmentViews, description="The views of pairing 'augment', and "
                                  "of pair_views (unused otherwise).")
    pair_views: bool = Field(False, description="Under a pairing of samples (same_instance, neighbor_pose), each row "
                             "and its partner each pass through one random view of `augment` before the loss, so the "
                             "pair also says that those changes (a mirror image, a crop) keep the object. First module "
                             "only (it reads images); off where a view changes what the pair means (a mirror image "
                             "turns azimuth the other way, so not with neighbor_pose for pose).")
    projection_dim: int | None = Field(
        None, ge=1, description="Width of a projection head used only by the loss (discarded after training); null = none."
    )


class InfoNCEPair(_ObjectiveBase):
    kind: Literal["infonce_pair"] = "infonce_pair"
    temperature: float = Field(0.1, gt=0, description="Softmax temperature of the scores.")
    bilinear: bool = Field(False, description="Score pairs with a learned bilinear W (z^T W z+) instead of cosine similarity.")
    pool: Literal["mean", "flatten"] = Field(
        "mean", description="How a feature map becomes the vector a pair of samples is scored on: 'mean' averages "
        "over positions (the loss sees which features, not where), 'flatten' keeps every position (C*H*W values "
        "into the projection head). Pairings within a sample (patch_grid, temporal) score positions: 'flatten' is an error there.")
    projection_hidden: int | None = Field(
        None, ge=1, description="Width of the projection head's hidden layer; null = the width of its input "
        "(SimCLR's). A flattened map is wide (C*H*W): a narrower hidden layer keeps the head cheap.")


class InfoNCEGrid(_ObjectiveBase):
    kind: Literal["infonce_grid"] = "infonce_grid"
    pairing: Literal["patch_grid", "temporal"] = Field(
        "patch_grid", description="The grid objective always pairs within the sample: 'patch_grid' for a patch grid "
        "or feature map (rows below), 'temporal' for a sequence (C, T) (steps ahead in time).")
    steps: int = Field(5, ge=1, description="Prediction steps k = 1..steps (rows below, or time steps ahead).")
    negatives: int = Field(16, ge=1, description="Negatives per positive, drawn from all positions and images of the batch.")


class SFA(_ObjectiveBase):
    kind: Literal["sfa"] = "sfa"
    eps: float = Field(1e-3, gt=0, description="Ridge added to the batch covariance before its Cholesky factor.")


class VInfoNCE(_ObjectiveBase):
    kind: Literal["vinfonce"] = "vinfonce"
    temperature: float = Field(0.1, gt=0, description="Softmax temperature of the InfoNCE scores on z.")
    kl_weight: float = Field(1e-3, ge=0, description="lambda: weight of KL(q(z|x) || N(0, I)).")
    latent_dim: int | None = Field(None, ge=1, description="Width of z (default: the module's output features).")


class SupervisedLocal(_ObjectiveBase):
    kind: Literal["supervised_local"] = "supervised_local"
    pairing: Literal["same_instance", "neighbor_pose", "patch_grid", "augment"] | None = Field(
        None, description="Unused: the supervised baseline needs labels, not pairs."
    )


class CPCAR(_ObjectiveBase):
    kind: Literal["cpc_ar"] = "cpc_ar"
    pairing: Literal["same_instance", "neighbor_pose", "patch_grid", "augment"] | None = Field(
        None, description="Unused: CPC predicts later steps of each sample's own grid or sequence, no pairs.")
    context: Literal["gru", "masked_conv"] = Field(
        "gru", description="Autoregressive context over the steps (rows of a map or patch grid, time of a (C, T) "
        "sequence): a GRU per column, or a causal (PixelCNN-style masked) convolution that sees only rows above.")
    context_dim: int | None = Field(None, ge=1, description="Width of the context c_t (default: the module's channels).")
    steps: int = Field(3, ge=1, description="Predict k = 1..steps steps ahead, each with its own bilinear W_k.")
    negatives: int = Field(16, ge=1, description="Negatives per positive, drawn from all steps and samples of the batch.")
    bptt_steps: int | None = Field(
        None, ge=1, description="Truncated backprop through time (gru context only): the hidden state is detached "
        "every bptt_steps steps, so no gradient crosses a chunk boundary; null = full backprop through time.")
    kernel: int = Field(3, ge=2, description="masked_conv context: rows above (incl. the current one) each layer sees.")


class DIM(_ObjectiveBase):
    kind: Literal["dim"] = "dim"
    pairing: Literal["same_instance", "neighbor_pose", "patch_grid", "augment"] | None = Field(
        None, description="Unused: Deep InfoMax contrasts a sample's local features with its own global vector.")
    estimator: Literal["infonce", "jsd"] = Field(
        "infonce", description="Mutual-information estimator (Hjelm et al. 2019): InfoNCE, or the Jensen-Shannon "
        "(softplus) bound, which the paper reports as more stable with few negatives.")
    max_locations: int = Field(256, ge=1, description="Local positions scored per step (a random subset when the map has more).")


class MoCo(_ObjectiveBase):
    kind: Literal["moco"] = "moco"
    temperature: float = Field(0.07, gt=0, description="Softmax temperature (MoCo's 0.07).")
    momentum: float = Field(
        0.99, ge=0, lt=1, description="Key encoder update k <- m k + (1 - m) q after each step; MoCo uses 0.999 over "
        "~1M steps, short runs need a faster key encoder.")
    queue_size: int = Field(1024, ge=1, description="Negatives kept in the queue of past keys (MoCo's 65536 on ImageNet).")


class Autoencoder(_ObjectiveBase):
    kind: Literal["autoencoder"] = "autoencoder"
    pairing: Literal["same_instance", "neighbor_pose", "patch_grid", "augment"] | None = Field(
        None, description="Unused: the autoencoder reconstructs the module's own input.")
    hidden: int = Field(64, ge=1, description="Width of the decoder (discarded after training).")


class AET(_ObjectiveBase):
    kind: Literal["aet"] = "aet"
    pairing: Literal["same_instance", "neighbor_pose", "patch_grid", "augment"] | None = Field(
        None, description="Unused: AET pairs each image with a randomly transformed copy of itself.")
    rotation: float = Field(180.0, ge=0, le=180, description="Rotations drawn from [-rotation, rotation] degrees (AET's 180).")
    translation: float = Field(0.2, ge=0, le=1, description="Shifts drawn from [-t, t] of the image size on each axis.")
    scale: tuple[float, float] = Field((0.7, 1.3), description="Isotropic scale factor range (AET's [0.7, 1.3]).")
    shear: float = Field(30.0, ge=0, lt=90, description="Shear angle drawn from [-shear, shear] degrees.")
    hidden: int = Field(256, ge=1, description="Width of the transformation decoder (discarded after training).")

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, found {list(v)}")
        return v


Objective = Annotated[
    Union[InfoNCEPair, InfoNCEGrid, SFA, VInfoNCE, SupervisedLocal, CPCAR, DIM, MoCo, Autoencoder, AET],
    Field(discriminator="kind"),
]
