"""The typed run configuration: one dataclass per section, the single source of truth for keys, types
and defaults (presets and `key=value` overrides merge onto it: load.py).

    cfg = load_config("tiny-cpu", ["optim.lr=3e-4"])   # a RunConfig
    cfg.truncation.k, cfg.rewards[0]["name"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from ...trainers.families import FAMILY_NAMES

DTYPE_NAMES = ("float32", "float16", "bfloat16")
CHECKPOINT_MODES = ("all", "none", "auto")  # sampling.checkpoint_unet (trainers/sampling.py)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # perf.compile_mode
FAMILY_CHOICES = ("auto", *FAMILY_NAMES)  # model.family (trainers/families.py)
ALGORITHMS = ("alignprop", "ddpo", "grpo", "refl", "draft_lv", "drtune", "direct_align")  # trainer.algorithm
# Run, sweep and config names become directory names and MLflow tag values: keep them plain.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SAFE_NAME_TEXT = "letters, digits and . _ + - (at most 128, not starting with . _ + -)"
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


@dataclass
class ModelSection:
    pretrained: Optional[str] = None  # hub id, local diffusers directory, or toy-world (the shipped toy pipeline)
    tiny: bool = False  # build the tiny offline pipeline instead
    # sd15 | sd21: build that published full-size architecture with random weights, offline
    # (platform/models/full_size.py): real sizes for benchmarks and tests without the hub
    arch: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"  # frozen VAE / text encoder / UNet weights
    # auto: read from the pipeline (model_index.json's _class_name; sd for model.tiny) | sd (SD 1.x/2.x
    # UNet) | sdxl (SDXL UNet, two text encoders) | sd3 (flow-matching MMDiT transformer)
    family: str = "auto"
    t5: bool = True  # sd3 only: load the T5 text encoder; false = CLIP only (zeros in T5's place, as diffusers does)


@dataclass
class LoraSection:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    # lora_B = 0 either way; lora_A ~ N(0, std 1/rank) as diffusers' LoRALinearLayer (the official
    # AlignProp code) and TRL's init_lora_weights="gaussian", or peft's default kaiming-uniform,
    # whose smaller A (std ≈ 0.02–0.03 on SD1.5) adapts ~10× slower at the same lr.
    init: str = "gaussian"


@dataclass
class SamplingSection:
    num_steps: int = 50  # N DDIM steps
    guidance_scale: float = 5.0
    eta: float = 1.0
    resolution: int = 512
    # activation checkpointing of the denoiser calls in the window (trainers/sampling.py CheckpointPlan):
    # all (true) | none (false) | auto: keep the activations of as many calls as fit activation_budget_mb
    checkpoint_unet: str = "all"
    # auto's budget; null: half the free GPU memory (CPU: 1/4 of MemAvailable)
    activation_budget_mb: Optional[float] = None
    checkpoint_vae: bool = False


@dataclass
class TruncationSection:
    # fixed | uniform | gaussian: contiguous last-K window (default); per_step: for reproductions of
    # the official code / TRL (a cut redrawn at every denoising step; see trainers/sampling.py)
    strategy: str = "fixed"
    k: int = 1  # fixed
    low: int = 1  # uniform bounds on K (inclusive); also the bounds on K for gaussian
    high: int = 50
    mean: float = 10.0  # gaussian on K (rounded, clipped to [low, high]) ...
    std: float = 5.0
    cut_mean: Optional[float] = None  # ... or, when set, gaussian on the cut index c, K = N − c
    cut_std: float = 5.0  # (official v2: cut_mean=42 cut_std=5 low=1 high=49 for N=50)
    cut_low: int = 0  # per_step: cut c_i ~ U{cut_low..cut_high} at every step i, detached if i < c_i
    cut_high: Optional[int] = None  # None: sampling.num_steps (official v1 / TRL: randint(0, 50), N=50)


@dataclass
class OptimSection:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    loss_scale: float = 1.0  # backward() on loss × loss_scale (official v1: 0.01 with max_grad_norm 5)
    # β of a KL regulariser (DPOK / Flow-GRPO style) for alignprop, refl, draft_lv and ddpo: loss += β · the
    # per-step KL of the tuned transitions to the base model's on the sampled trajectory (one adapter-off
    # denoiser call per step that keeps a gradient; at eta 0 the squared prediction difference). Logged as `kl`.
    # grpo has its own, grpo.kl_coef.
    kl_coef: float = 0.0


@dataclass
class TrainerSection:
    batch_size: int = 2  # per worker
    max_steps: int = 100  # optimizer steps
    seed: int = 0
    prompts: list[str] = field(default_factory=list)
    prompt_file: Optional[str] = None  # a path, or the name of a file in platform/prompts/
    eval_prompts: list[str] = field(default_factory=list)
    eval_prompt_file: Optional[str] = None  # like prompt_file; read on the driver into eval_prompts
    eval_seed: int = 1234
    eval_seeds: int = 2  # samples of each held-out prompt (>= 2: eval/diversity compares them)
    # the evaluation sampler (null: the training sampler's sampling.eta / sampling.num_steps): methods that train
    # with their own sampler (DDPO, GRPO at eta 1; AlignProp at eta 0) are judged by one common sampler
    eval_eta: Optional[float] = None
    eval_num_steps: Optional[int] = None
    # LoRA scales every evaluation scores (DRaFT's remedy for over-optimisation): 1.0 as `eval/...`, another s as
    # `eval_lora<s>/...` (MLflow allows no '@'; e.g. [0.5, 1.0]); `alignprop sample --lora-scale` and the MLflow
    # Model's `lora_scale` param
    eval_lora_scales: list[float] = field(default_factory=lambda: [1.0])
    # a validation split, scored like the held-out set at every evaluation as `val/...` (choose hyperparameters
    # on it, report `eval/...`): a list, or a file like prompt_file (toy_val.txt: 64 toy captions)
    val_prompts: list[str] = field(default_factory=list)
    val_prompt_file: Optional[str] = None
    # m images of each drawn prompt per optimizer step (batch = B·accum·workers / m prompts × m): per-prompt
    # statistics (DDPO's stat tracker) exist on small prompt sets; grpo uses grpo.group_size instead
    images_per_prompt: int = 1
    best_metric: str = "eval/reward_total"  # what `lora/best`, Tune's default metric and summaries select on (max)
    eval_every: int = 10  # 0 disables evaluation
    ckpt_every: int = 10
    keep_checkpoints: int = 2
    # e.g. eval/colorfulness, or best (= trainer.best_metric): stop when it stops improving; null: never
    early_stop_metric: Optional[str] = None
    early_stop_patience: int = 3  # evaluations without a new best before stopping
    ema_decay: float = 0.0  # EMA of the LoRA weights (0 disables); evaluated and saved beside them
    fail_at_step: Optional[int] = None  # fault injection for tests: raise at this step unless resumed
    # alignprop (reward backprop through the last K steps) | ddpo (RL: DDPO-IS with PPO clipping) |
    # grpo (RL: group-normalised advantages, PPO clip, KL to the base; Flow-GRPO / DanceGRPO) |
    # refl (reward on x̂0 from one random late step) | draft_lv (K = 1 with re-noised copies) |
    # drtune (K calls spread over the chain, inputs detached) | direct_align (one step anywhere, x̂0 from known noise)
    algorithm: str = "alignprop"


@dataclass
class DDPOSection:
    """trainer.algorithm=ddpo. Defaults: kvablack/ddpo-pytorch config/base.py (`train.*`)."""

    inner_epochs: int = 1  # train.num_inner_epochs: passes (one update each) over a sampled batch
    clip_range: float = 1e-4  # train.clip_range: PPO's ε on the importance ratio
    adv_clip_max: float = 5.0  # train.adv_clip_max: advantages clipped to ±this
    timestep_fraction: float = 1.0  # train.timestep_fraction: share of each trajectory's steps trained on
    train_cfg: bool = True  # train.cfg: the policy's log-prob uses the guided prediction, as sampled
    per_prompt_stats: bool = True  # per_prompt_stat_tracking: advantages from each prompt's recent rewards
    stats_buffer: int = 16  # per_prompt_stat_tracking.buffer_size
    stats_min_count: int = 16  # per_prompt_stat_tracking.min_count: below it, the batch's mean and std
    # optimizer steps per sampled batch (ddpo-pytorch: 256 samples per epoch, 2 updates of 128): the batch is
    # shuffled and split, so the later updates are off-policy and PPO's ratio and clip act; divides optim.grad_accum
    updates_per_epoch: int = 1


@dataclass
class GRPOSection:
    """trainer.algorithm=grpo. Defaults: yifan123/flow_grpo config/base.py + config/grpo.py (`train.*`, `sample.*`)."""

    group_size: int = 8  # sample.num_image_per_prompt: images of one prompt per step, advantages within the group
    global_std: bool = True  # sample.global_std: divide by the std of all the step's rewards (false: the group's)
    clip_range: float = 1e-4  # train.clip_range
    adv_clip_max: float = 5.0  # train.adv_clip_max
    kl_coef: float = 0.04  # train.beta: KL of each step's Gaussian to the base (adapter off) policy's
    timestep_fraction: float = 0.99  # train.timestep_fraction: the first int(N·fraction) steps are trained
    inner_epochs: int = 1  # train.num_inner_epochs
    updates_per_epoch: int = 1  # optimizer steps per sampled batch (Flow-GRPO: 2); divides optim.grad_accum
    train_cfg: bool = True  # train.cfg
    # sd3: the flow-matching SDE's noise level a (sample.noise_level; its step is `sde_step_with_logprob`);
    # sd/sdxl use DDIM with sampling.eta > 0 (DanceGRPO)
    sde_noise: float = 0.7


@dataclass
class ReFLSection:
    """trainer.algorithm=refl: stop at a random step (0-based sampling index) in [low, high], predict
    x̂0 in one step, reward on x̂0, gradient through that step only. None: low = ⌊3N/4⌋, high = N − 1
    (ImageReward's ReFL: 40 steps, stop step randint(30, 39))."""

    low: Optional[int] = None
    high: Optional[int] = None


@dataclass
class DraftLVSection:
    """trainer.algorithm=draft_lv: sample without a graph, then `copies` times re-noise x0 to the last
    step's noise level and denoise it once with a graph; the reward gradient is averaged over the
    copies (DRaFT-LV, Clark et al. 2023, n = 2)."""

    copies: int = 2


@dataclass
class DRTuneSection:
    """trainer.algorithm=drtune (Wu et al., ECCV 2024, arXiv 2405.00760; trainers/drtune.py): the reward's
    gradient reaches `train_steps` denoiser calls spread evenly over the chain with a random offset per
    (step, micro-batch), early ones included; with `stop_input_grad` each call's input x_t is detached,
    so the gradient runs back through the samplers' linear updates only, never through a call's input."""

    train_steps: int = 3  # K (RuoyuWang-2077/FlowBP's flux1_drtune.yaml: 3 of 25; the paper's K unconfirmed here)
    stop_input_grad: bool = True  # false: the same steps with the full chain (an ablation)


@dataclass
class DirectAlignSection:
    """trainer.algorithm=direct_align (SRPO, arXiv 2509.06942; trainers/direct_align.py): sample x0 without a
    graph, noise it with its own initial noise to a sampling step i drawn from [t_low·N, t_high·N), take that
    one step with a graph, recover x̂0 in closed form from the known noise, reward on x̂0."""

    t_low: float = 0.1  # fractions of the sampling schedule (0: pure noise, 1: clean); SRPO (FLUX): steps 5..25
    t_high: float = 0.5  # of a 50-step schedule (σ ≈ 0.96 … 0.75 at shift 3)


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16


@dataclass
class PerfSection:
    """Speed switches (trainers/perf.py); none changes what is trained except autocast's rounding."""

    # none | bf16 | fp16: run the denoiser, VAE and rewards under torch.autocast (frozen weights in
    # model.dtype, LoRA weights and their AdamW state fp32; use with deepspeed.precision fp32/auto)
    autocast: str = "none"
    attention: str = "sdpa"  # sdpa (torch's scaled_dot_product_attention) | eager (diffusers' AttnProcessor)
    channels_last: bool = False  # UNet and VAE in channels-last memory format (convolutions)
    tf32: bool = True  # CUDA: TF32 tensor cores for float32 matmuls and convolutions
    compile_prefix: bool = False  # torch.compile the denoiser for the no-grad steps before the window
    # torch.compile's mode for it: default | reduce-overhead (CUDA graphs: no per-kernel launch cost) | max-autotune
    compile_mode: str = "default"
    # fold: the calls that need no gradient (the prefix before the window, evaluation, DDPO/GRPO sampling)
    # run with W + s·B·A folded into the weights, as fast as the bare model | wrapped: through peft's layers
    lora_prefix: str = "fold"


@dataclass
class RaySection:
    address: Optional[str] = None  # None: RAY_ADDRESS or a local Ray
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    resource_wait_s: Optional[float] = None  # None: refuse at once on a local Ray, wait up to 600 s on a cluster
    storage_path: Optional[str] = None  # None: ~/ray_results
    start_timeout_s: float = 120.0  # a local Ray that times out during startup (a busy machine) starts again until then
    max_failures: int = 0


@dataclass
class TrackingSection:
    uri: Optional[str] = None  # None: sqlite:///<cwd>/mlflow.db
    experiment: Optional[str] = None  # None: the config's name
    run_name: Optional[str] = None  # None: <config name>-<hash of what shapes the training>


@dataclass
class RunConfig:
    name: str = MISSING
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    truncation: TruncationSection = field(default_factory=TruncationSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    rewards: list[Any] = field(default_factory=lambda: [{"name": "brightness", "weight": 1.0}])
    eval_rewards: list[Any] = field(default_factory=list)
    ddpo: DDPOSection = field(default_factory=DDPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    refl: ReFLSection = field(default_factory=ReFLSection)
    draft_lv: DraftLVSection = field(default_factory=DraftLVSection)
    drtune: DRTuneSection = field(default_factory=DRTuneSection)
    direct_align: DirectAlignSection = field(default_factory=DirectAlignSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    perf: PerfSection = field(default_factory=PerfSection)
    ray: RaySection = field(default_factory=RaySection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain dict (what travels to Ray workers and into YAML artifacts)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: dict[str, Any]) -> RunConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# the section that the algorithm of that name alone reads
ALGORITHM_SECTIONS = ("ddpo", "grpo", "refl", "draft_lv", "drtune", "direct_align")


def run_params(cfg: "RunConfig") -> dict[str, Any]:
    """A run's MLflow params: `algorithm` (sorts first in the UI's alphabetical params view) and the
    flattened config without the sections of the algorithms it does not run (an AlignProp run lists no
    `ddpo.*`); `config.yaml` beside them keeps every field."""
    algorithm = cfg.trainer.algorithm
    unused = set(ALGORITHM_SECTIONS) - {algorithm}
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if k.split(".", 1)[0] not in unused}
    return {"algorithm": algorithm, **params}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} → {"optim.lr": 1}; reward lists by label ("rewards.brightness.weight")."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(x, dict) and "name" in x for x in data):
        for item in data:
            label = item.get("label", item["name"])
            out.update(flatten({k: v for k, v in item.items() if k not in ("name", "label")}, f"{prefix}{label}."))
    else:
        out[prefix[:-1]] = data
    return out
