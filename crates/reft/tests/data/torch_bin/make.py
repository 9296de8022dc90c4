"""Writes the `pytorch_model.bin` test folders next to this script.

Run from the repository root with a Python that has torch and transformers:

    python crates/reft/tests/data/torch_bin/make.py crates/reft/tests/fixtures/models

The tiny models come from the test fixtures (safetensors); each is re-saved with
`save_pretrained(..., safe_serialization=False)`, the way older Hugging Face repositories ship
their weights. `views.bin` and `legacy.bin` hold hand-made tensors that exercise what a state dict
rarely does (shared storages, strided views, offsets, many dtypes); `evil.bin` is a torch.save
file whose pickle would run a shell command when unpickled by Python.
"""

import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

here = os.path.dirname(os.path.abspath(__file__))
models = sys.argv[1]


def fresh(name):
    d = os.path.join(here, name)
    shutil.rmtree(d, ignore_errors=True)
    return d


def keep_only_weights_and_config(d):
    for f in os.listdir(d):
        if f != "config.json" and not f.startswith("pytorch_model"):
            os.remove(os.path.join(d, f))


# Decoder, f32, one file.
m = AutoModelForCausalLM.from_pretrained(os.path.join(models, "tiny-llama"))
d = fresh("tiny-llama")
m.save_pretrained(d, safe_serialization=False)
keep_only_weights_and_config(d)

# Decoder, bf16, one file.
d = fresh("tiny-llama-bf16")
m.to(torch.bfloat16).save_pretrained(d, safe_serialization=False)
keep_only_weights_and_config(d)

# Encoder with its classifier head, f32, sharded (an index plus several shards).
m = AutoModelForSequenceClassification.from_pretrained(os.path.join(models, "tiny-bert"))
d = fresh("tiny-bert-sharded")
m.save_pretrained(d, safe_serialization=False, max_shard_size="200KB")
keep_only_weights_and_config(d)

# GPT-2, f16: `lm_head.weight` and `transformer.wte.weight` share one storage (tied).
m = AutoModelForCausalLM.from_pretrained(os.path.join(models, "tiny-gpt2"))
d = fresh("tiny-gpt2-f16")
m.to(torch.float16).save_pretrained(d, safe_serialization=False)
keep_only_weights_and_config(d)


def views():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "base": base,
        # Shares `base`'s storage: a transpose (strides (1, 6)) and a slice at offset 7.
        "transposed": base.t(),
        "slice": base[1:3, 1:4],
        "f16": torch.tensor([[0.5, -1.25], [3.0, 65504.0]], dtype=torch.float16),
        "bf16": torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16),
        "f64": torch.tensor([1e-300, 2.0], dtype=torch.float64),
        "i64": torch.tensor([-3, 1 << 40], dtype=torch.int64),
        "scalar": torch.tensor(7.5),
    }


torch.save(views(), os.path.join(here, "views.bin"))
torch.save(views(), os.path.join(here, "legacy.bin"), _use_new_zipfile_serialization=False)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this pickle ran a shell command",))


torch.save({"w": torch.zeros(2), "payload": Evil()}, os.path.join(here, "evil.bin"))
