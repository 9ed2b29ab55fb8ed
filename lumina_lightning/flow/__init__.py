"""Rectified-flow maths: the time convention (t=0 noise, t=1 data) and the training objective."""

from lumina_lightning.flow.convention import (
    PREDICTIONS,
    check_prediction,
    interpolate,
    sigma_to_t,
    t_to_sigma,
    velocity_from_output,
    velocity_target,
    velocity_to_sigma_flow,
)
from lumina_lightning.flow.objective import (
    TimestepBins,
    flow_matching_loss,
    image_seq_len,
    per_sample_mse,
    pool_latents,
    sample_timesteps,
    shift_mu,
    stratified_timesteps,
    time_shift,
    training_shift,
)

__all__ = [
    "PREDICTIONS",
    "TimestepBins",
    "check_prediction",
    "flow_matching_loss",
    "image_seq_len",
    "interpolate",
    "per_sample_mse",
    "pool_latents",
    "sample_timesteps",
    "shift_mu",
    "sigma_to_t",
    "stratified_timesteps",
    "t_to_sigma",
    "time_shift",
    "training_shift",
    "velocity_from_output",
    "velocity_target",
    "velocity_to_sigma_flow",
]
