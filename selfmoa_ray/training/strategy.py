"""How a Ray Train worker wraps its model: plain torch DDP, or DeepSpeed ZeRO.

Both strategies expose the same few calls to the worker loop, so the loop reads the same for
either: ``model`` (what to call forward on), ``backward(loss)`` and ``step()`` on every
micro-batch (gradient accumulation, clipping and the optimizer step happen inside), and
``save(dir)`` / ``load(dir)`` for checkpoints. Both run on the process group Ray Train has already
set up (gloo on CPU, NCCL on GPUs).

* DDP: ``ray.train.torch.prepare_model`` (moves to the worker's device, wraps in DDP when there
  is more than one worker) and a torch AdamW. The CPU default: on 2 cores it is as fast as
  DeepSpeed under LoRA and ~10% faster for full fine-tuning (``benchmarks/training.py``).
* DeepSpeed ZeRO-1/2/3 (bf16, optional CPU offload of optimizer state) for GPUs; ZeRO-1/2 also run
  on CPU over gloo. The first use in a fresh environment JIT-builds DeepSpeed's ``shm_comm`` op
  (50-120 s, cached under ``~/.cache/torch_extensions``). DeepSpeed is an extra
  (``selfmoa-ray[deepspeed]``, part of ``[gpu]``), imported only when this strategy is used.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch

from selfmoa_ray.config import TrainSection
from selfmoa_ray.precision import resolve_precision

STATE_FILE = "train_state.pt"
DEEPSPEED_MISSING = (
    "train.strategy: deepspeed needs DeepSpeed, which is not installed: "
    "pip install 'selfmoa-ray[deepspeed]' (or set train.strategy: ddp)"
)


class Strategy(Protocol):
    model: torch.nn.Module
    autocast: bool  # whether the loop runs forward under bf16 autocast

    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> bool: ...
    def save(self, directory: Path, client_state: dict[str, Any]) -> None: ...
    def load(self, directory: Path) -> dict[str, Any]: ...
    def unwrapped(self) -> torch.nn.Module: ...


def local_device() -> str:
    """Where this worker computes: "cuda" when it sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def forward_numerics(cfg: TrainSection, device: str = "cpu") -> tuple[str, bool]:
    """(weights dtype, bf16 autocast) of the trainer's forward pass on ``device``.

    The reference pass computes its log-probabilities the same way, so that log pi and log ref
    agree at step 0 (a float32 reference against a bf16 policy would open a margin of its own):

    * fp32: float32 weights, no autocast;
    * bf16 under DDP: float32 master weights, bf16 matmuls (autocast);
    * bf16 under DDP with LoRA: the frozen base in bf16, float32 adapters (peft keeps them so),
      under autocast: half the base's memory and no float32 copy of it;
    * bf16 under DeepSpeed: bf16 weights (DeepSpeed casts the module; its optimizer keeps
      float32 master weights).
    """
    if resolve_precision(cfg.precision, device) != "bf16":
        return "float32", False
    if cfg.strategy == "deepspeed":
        return "bfloat16", False
    return ("bfloat16" if cfg.lora.enabled else "float32"), True


def import_deepspeed() -> ModuleType:
    """DeepSpeed, imported on first use: an optional extra that the default DDP path never needs."""
    try:
        import deepspeed
    except ModuleNotFoundError as err:
        if err.name != "deepspeed":  # installed but broken: DeepSpeed's own error says more
            raise
        raise ModuleNotFoundError(DEEPSPEED_MISSING, name="deepspeed") from err
    return deepspeed


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class DDPStrategy:
    """torch DDP (through Ray Train) with AdamW and gradient accumulation."""

    def __init__(self, model: torch.nn.Module, cfg: TrainSection):
        import ray.train.torch

        self.model = ray.train.torch.prepare_model(model)
        self.cfg = cfg
        # fused: one kernel over all parameters (CPU and CUDA); 0.57 -> 0.20 s per step for
        # SmolLM2-135M on 2 cores, the same update up to rounding
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
            fused=True,
        )  # fmt: skip
        self.micro_steps = 0
        self.autocast = forward_numerics(cfg, local_device())[1]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> bool:
        """Count a micro-batch; step the optimizer at accumulation boundaries (returns True)."""
        self.micro_steps += 1
        if self.micro_steps % self.cfg.grad_accum:
            return False
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def unwrapped(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Trainable weights (the LoRA adapter alone, under LoRA), optimizer and loop state."""
        model = self.unwrapped()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in model.state_dict().items() if k in trainable}
        state = {"model": weights, "optimizer": self.optimizer.state_dict(), "client": client_state}
        torch.save(state, directory / STATE_FILE)

    def load(self, directory: Path) -> dict[str, Any]:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        missing = self.unwrapped().load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint has unknown weights: {missing.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps = int(state["client"].get("micro_steps", 0))
        return state["client"]


def deepspeed_config(cfg: TrainSection, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config from ours. The optimizer is our torch AdamW (client optimizer)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no fused_adam JIT build needed
        "bf16": {"enabled": resolve_precision(cfg.precision, local_device()) == "bf16"},
        "steps_per_print": 1 << 30,  # metrics go through ray.train.report, not DeepSpeed's log
    }


class DeepSpeedStrategy:
    """DeepSpeed ZeRO engine on Ray Train's process group."""

    def __init__(self, model: torch.nn.Module, cfg: TrainSection):
        import ray.train

        deepspeed = import_deepspeed()

        self.cfg = cfg
        self.world_size = ray.train.get_context().get_world_size()
        params = trainable_parameters(model)
        optimizer = (
            _cpu_adam(params, cfg)
            if cfg.cpu_offload
            else torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        )
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(cfg, self.world_size),
            dist_init_required=False,
        )
        self.autocast = False  # DeepSpeed casts the module itself when bf16 is on

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> bool:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        return boundary

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Every rank writes its ZeRO shard; Ray Train gathers all ranks' files in one folder."""
        self.model.save_checkpoint(
            str(directory), tag="state", client_state={"selfmoa": client_state}
        )

    def load(self, directory: Path) -> dict[str, Any]:
        _, client = self.model.load_checkpoint(str(directory), tag="state")
        if client is None or "selfmoa" not in client:
            raise RuntimeError(f"no DeepSpeed checkpoint of ours in {directory}")
        return client["selfmoa"]


def _cpu_adam(params: list[torch.nn.Parameter], cfg: TrainSection) -> torch.optim.Optimizer:
    """ZeRO-Offload wants DeepSpeed's CPU Adam (JIT-built on first use)."""
    import_deepspeed()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_strategy(model: torch.nn.Module, cfg: TrainSection) -> Strategy:
    return DeepSpeedStrategy(model, cfg) if cfg.strategy == "deepspeed" else DDPStrategy(model, cfg)
