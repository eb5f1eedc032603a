"""Real PEFT LoRA adapters on the tiny model, and example prompts, shared by the library and serving tests."""

from __future__ import annotations

import torch

from mixroute.models import tiny_model

PROMPTS = {  # two clearly different prompt families (domains)
    "math": ["What is 12 + 7?", "Compute 3 * 14.", "What is 100 - 58?", "Add 9 and 16."],
    "code": ["def f(x): return x[::-1]  # explain", "for i in range(3): print(i)  # explain",
             "import os; os.listdir('.')  # explain", "while True: break  # explain"],
}


def peft_adapter(path, r=4, alpha=8, targets=("q_proj", "v_proj"), seed=0, spec=None, **extra):
    """A real PEFT LoRA adapter with random (non-zero) A and B on the tiny model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = tiny_model(spec=spec)[0]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **extra)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft.save_pretrained(str(path))
    return str(path)
