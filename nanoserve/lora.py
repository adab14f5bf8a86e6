"""Multi-LoRA: many PEFT adapters on one base model, mixed in the same batch.

Storage: every LoRA-capable linear layer (qkv_proj, o_proj, gate_up_proj, down_proj) holds A and B of fixed
shape, a block of `width` = shards * max_rank columns per slot (one slot per loaded adapter):
A [max_loras * width, in] and B [out, max_loras * width], zero where an adapter has a smaller rank or does not
target a shard.
A fused layer's shards (q, k, v) each get their own rank block: A stacks their A matrices, and B puts each
shard's B in its rows and its own columns, so B · (A · x) is exactly the three adapters side by side. The
per-slot scaling (lora_alpha / r, or lora_alpha / sqrt(r) with rslora) is folded into B at load.

Forward: the runner tells the manager each token's slot before a step (`prepare`; -1 for the base model);
each LoRA layer then adds B[slot] · (A[slot] · x) to every token. Two ways, the same sums:
- eager (the CPU default): one pair of matmuls per slot present, over its tokens (segmented, not gathered per
  token: fewer bytes moved); a batch without LoRA tokens skips the layer's LoRA work entirely;
- `static` (under torch.compile and CUDA graphs): every token through every slot's A at once, [T, max_loras *
  width], masked to its own slot's columns, then through B. Its shapes depend on nothing but the token count,
  and the slots are read from a fixed buffer (`token_slots`), so any mix of adapters, or none, runs the same
  compiled graph, and a captured CUDA graph replays with this step's slots. It costs max_loras times the
  rank's FLOPs, small next to the layer's own matmul.

Slots: `LoRAManager.slot_for(request)` loads an adapter into a free slot, or evicts the least recently used
slot that no running sequence holds; when running sequences hold every slot, the request waits in the engine
(`LLMEngine.lora_waiting`) until one is let go, as in vLLM.
"""
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

# PEFT's module name -> (our layer, shard index)
TARGETS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: a name (what a server request calls `model`), a positive id, and the PEFT adapter directory."""
    lora_name: str
    lora_int_id: int
    lora_path: str


class LoRALayer:
    def __init__(self, linear, manager: "LoRAManager", max_loras: int, max_rank: int):
        shards = getattr(linear, "shard_sizes", [linear.out_features])
        self.manager, self.shard_sizes, self.rank = manager, shards, max_rank
        self.width = w = len(shards) * max_rank  # a slot's columns
        dtype, device = manager.dtype, manager.device  # not the layer's weight: a quantized layer has none
        self.a = torch.zeros(max_loras * w, linear.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(linear.out_features, max_loras * w, dtype=dtype, device=device)
        self.column_slot = torch.arange(max_loras, device=device).repeat_interleave(w)  # the slot of each column

    def set(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        r, rows = a.shape[0], sum(self.shard_sizes[:shard])
        cols = slot * self.width + shard * self.rank
        self.a[cols:cols + r] = a
        self.b[rows:rows + b.shape[0], cols:cols + r] = b * scaling

    def clear(self, slot: int) -> None:
        self.a[slot * self.width:(slot + 1) * self.width].zero_()
        self.b[:, slot * self.width:(slot + 1) * self.width].zero_()

    def add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.manager.static:
            mine = self.manager.token_slots[:x.shape[0], None] == self.column_slot[None, :]  # [T, slots * width]
            return out + ((x @ self.a.t()) * mine.to(x.dtype)) @ self.b.t()
        for slot, rows in self.manager.token_groups:
            xs = x[rows] if rows is not None else x
            cols = slice(slot * self.width, (slot + 1) * self.width)
            delta = (xs @ self.a[cols].t()) @ self.b[:, cols].t()
            if rows is None:
                out = out + delta
            else:
                out = out.index_add(0, rows, delta)
        return out


class LoRAManager:
    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int, max_tokens: int, static: bool = False):
        from .linear import Linear
        self.max_loras, self.max_rank, self.static = max_loras, max_rank, static
        self.dtype, self.device = next(model.parameters()).dtype, next(model.parameters()).device
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.long, device=self.device)  # static: refilled
        self.layers: dict[str, LoRALayer] = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in {t for t, _ in TARGETS.values()}:
                module.lora = self.layers[name] = LoRALayer(module, self, max_loras, max_rank)
        self.slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self.token_groups: list[tuple[int, torch.Tensor | None]] = []  # this step's (slot, token rows)

    def slot_for(self, request: LoRARequest, busy: set[int]) -> int | None:
        """The adapter's slot, loading it first if needed; `busy` holds the ids running sequences use. None when
        every slot is held by a running sequence: the request waits for one (the engine retries each step)."""
        if request.lora_int_id in self.slots:
            self.slots.move_to_end(request.lora_int_id)
            return self.slots[request.lora_int_id]
        used = set(self.slots.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if not free:
            victim = next((i for i in self.slots if i not in busy), None)
            if victim is None:
                return None
            free = [self.slots.pop(victim)]
        self._load(request, free[0])
        self.slots[request.lora_int_id] = free[0]
        return free[0]

    def _load(self, request: LoRARequest, slot: int) -> None:
        config = check_adapter(request.lora_path, self.max_rank)
        tensors = load_file(os.path.join(request.lora_path, "adapter_model.safetensors"))
        r = config["r"]
        scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        for layer in self.layers.values():
            layer.clear(slot)
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[:-len(".lora_A.weight")]  # "base_model.model.model.layers.0.self_attn.q_proj"
            module = module[module.index("layers."):]
            prefix, _, target = module.rpartition(".")
            ours, shard = TARGETS[target]
            b = tensors[key.replace("lora_A", "lora_B")]
            layer = self.layers.get(f"{prefix}.{ours}")
            if layer is None:  # e.g. a mixture of experts' per-expert projections
                raise ValueError(f"LoRA adapter {request.lora_path} targets {module}, which has no LoRA support")
            layer.set(slot, shard, a.float(), b.float(), scaling)

    def prepare(self, items: list[tuple[int, int]]) -> None:
        """The next forward pass's (slot, number of tokens) per scheduled item, in batch order (-1: the base
        model). Static: every token's slot in `token_slots` (-1 past them: a CUDA graph's padding rows). Else each
        slot present gets the rows of its tokens, or None when it has them all."""
        if self.static:
            slots = [slot for slot, count in items for _ in range(count)]
            if len(slots) > len(self.token_slots):  # eager only: a compiled graph never sees more than the budget
                self.token_slots = torch.full((len(slots),), -1, dtype=torch.long, device=self.token_slots.device)
            self.token_slots.fill_(-1)
            self.token_slots[:len(slots)].copy_(torch.tensor(slots), non_blocking=True)
            return
        present = sorted({slot for slot, _ in items})
        if present == [-1]:
            self.token_groups = []
        elif len(present) == 1:
            self.token_groups = [(present[0], None)]
        else:
            slots, counts = zip(*items)
            index = torch.tensor(slots).repeat_interleave(torch.tensor(counts))
            self.token_groups = [(s, (index == s).nonzero().squeeze(1)) for s in present if s != -1]


def check_adapter(path: str, max_rank: int) -> dict:
    """PEFT's adapter_config.json, checked: LoRA, supported targets, rank, nothing else trained."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    unsupported = sorted(set(targets) - set(TARGETS))
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"Unsupported LoRA adapter in {path}: nanoserve applies LoRA to {sorted(TARGETS)}, "
                         f"this one targets {unsupported or config.get('peft_type')}")
    if config["r"] > max_rank:
        raise ValueError(f"LoRA rank {config['r']} of {path} exceeds max_lora_rank={max_rank}")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path} trains extra modules or biases, which nanoserve does not apply")
    if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        raise ValueError(f"LoRA adapter {path} has no adapter_model.safetensors")
    return config
