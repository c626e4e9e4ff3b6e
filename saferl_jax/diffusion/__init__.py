"""Diffusion sampling with per-step log-probabilities, rewards, and reward fine-tuning.

Floor 1 here: noise schedules (`schedules`), the stochastic DDIM step and its Gaussian
log-density (`step`), the rectified flow's SDE and ODE steps and loss (`flow`), conditions of any
structure (`conditions`), the scanned sampler with a swappable step (`sampler`), the REINFORCE /
PPO / GRPO / LOOP losses, advantages and DDPO's tracker (`losses`) and rewards of final samples
(`rewards`). The NNX denoisers and classifier
(`saferl_jax.models`), pretraining and fine-tuning (`saferl_jax.training`) are re-exported lazily.
"""

from saferl_jax._lazy import lazy_exports
from saferl_jax.diffusion import conditions
from saferl_jax.diffusion.flow import (FlowSchedule, check_flow_schedule, flow_matching_loss,
                                       flow_ode_step, flow_schedule, flow_sde_step,
                                       flow_step_log_prob, flow_timesteps)
from saferl_jax.diffusion.losses import (PPOLoss, PromptTracker, PromptTrackerState, RewardStats,
                                         RewardStatsState, TrackedAdvantages, epsilon_loss,
                                         grpo_advantages, loop_advantages, ppo_advantages, ppo_loss,
                                         prompt_tracker, reinforce_loss, reward_stats)
from saferl_jax.diffusion.rewards import (CombinedReward, RewardComponents, combine_rewards,
                                          compressibility_reward, prompt_alignment_reward,
                                          quality_reward, tilt_reward)
from saferl_jax.diffusion.sampler import (Trajectory, Transitions, differentiable_sample, generate,
                                          sample, select_samples,
                                          select_step, stepwise_value_and_grad,
                                          trajectory_log_probs, trajectory_transitions)
from saferl_jax.diffusion.schedules import (NoiseSchedule, SamplingTimesteps, alphabar,
                                            check_schedule, cosine_schedule, linear_schedule,
                                            sampling_timesteps)
from saferl_jax.diffusion.step import (REDUCTIONS, Step, ddim_step, guided_eps, step_kl,
                                       step_log_prob)

__all__ = [
    # Schedules and the DDIM step (schedules.py, step.py).
    "NoiseSchedule", "SamplingTimesteps", "alphabar", "check_schedule", "cosine_schedule",
    "linear_schedule", "sampling_timesteps", "REDUCTIONS", "Step", "ddim_step", "guided_eps",
    "step_kl", "step_log_prob",
    # Sampling with log-probs (sampler.py).
    "Trajectory", "Transitions", "differentiable_sample", "generate", "sample", "select_samples", "select_step",
    "stepwise_value_and_grad", "trajectory_log_probs", "trajectory_transitions",
    # Rectified flow (flow.py) and conditions of any structure (conditions.py).
    "FlowSchedule", "check_flow_schedule", "flow_matching_loss", "flow_ode_step", "flow_schedule",
    "flow_sde_step", "flow_step_log_prob", "flow_timesteps", "conditions",
    # Policy-gradient losses, advantages and DDPO's tracker (losses.py).
    "PPOLoss", "PromptTracker", "PromptTrackerState", "RewardStats", "RewardStatsState",
    "TrackedAdvantages", "epsilon_loss", "grpo_advantages", "loop_advantages", "ppo_advantages",
    "ppo_loss", "prompt_tracker", "reinforce_loss", "reward_stats",
    # Rewards (rewards.py).
    "CombinedReward", "RewardComponents", "combine_rewards", "compressibility_reward",
    "prompt_alignment_reward", "quality_reward", "tilt_reward",
]

# Floors 2 and 3: denoisers, the classifier, pretraining and fine-tuning, loaded on first use.
_LAZY = {
    "MLPDenoiser": "saferl_jax.models.denoisers",
    "ConvDenoiser": "saferl_jax.models.denoisers",
    "DigitClassifier": "saferl_jax.models.classifier",
    "pretrain": "saferl_jax.training.pretraining",
    "train_classifier": "saferl_jax.training.classifier",
    "finetune": "saferl_jax.training.finetuning",
    "Sampling": "saferl_jax.training.finetuning",
    "Prompts": "saferl_jax.training.finetuning",
    "Constraints": "saferl_jax.training.finetuning",
    "FinetuneResult": "saferl_jax.training.finetuning",
    "class_prompts": "saferl_jax.training.finetuning",
    "VectorEncoder": "saferl_jax.models.denoisers",
    "SequenceEncoder": "saferl_jax.models.denoisers",
    "ClassEncoder": "saferl_jax.models.denoisers",
    "TrainResult": "saferl_jax.training.driver",
}
__all__ += list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
