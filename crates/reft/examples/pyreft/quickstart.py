"""pyreft's quickstart on the weights reft uses, for side-by-side comparison with `reft quickstart`.

First export the model (`cargo run --release -p reft --example export_hf -- HF_DIR`), then, in a
Python environment with torch, transformers and pyreft 0.1.0:

    python crates/reft/examples/pyreft/quickstart.py HF_DIR [SEED] [EPOCHS]

It trains the same adapter as `reft quickstart` (rank-4 LoReFT at layer 15 block_output, last
prompt position, lr 4e-3, batch 10, linear decay, SmolLM2's chat template with its default
system prompt), prints the loss log and the time per step, then answers the same ten unseen
prompts greedily (32 new tokens) and counts the answers without letters.
"""
import json
import pathlib
import sys
import time

import torch
import transformers
import pyreft

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def data_lines(name):
    """The non-empty lines of a file in the crate's data folder (shared with reft)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "data" / name
    return [line for line in path.read_text().splitlines() if line.strip()]


def prompt(question):
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def main():
    hf_dir = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 42
    epochs = float(sys.argv[3]) if len(sys.argv) > 3 else 100.0
    data = [json.loads(line) for line in data_lines("quickstart_emoji.jsonl")]
    held_out = data_lines("quickstart_held_out.txt")

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=f"{hf_dir}/tokenizer.json",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        padding_side="right",
    )
    tok.pad_token = tok.eos_token
    tok.model_max_length = 2048
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)

    config = pyreft.ReftConfig(
        representations={
            "layer": 15,
            "component": "block_output",
            "low_rank_dimension": 4,
            "intervention": pyreft.LoreftIntervention(
                embed_dim=model.config.hidden_size, low_rank_dimension=4, dtype=torch.float32
            ),
        }
    )
    reft_model = pyreft.get_reft_model(model, config)
    reft_model.set_device("cpu")
    module = pyreft.make_last_position_supervised_data_module(
        tok, model, [prompt(d["prompt"]) for d in data], [d["response"] for d in data]
    )
    args = transformers.TrainingArguments(
        num_train_epochs=epochs,
        output_dir="pyreft-quickstart",
        per_device_train_batch_size=10,
        learning_rate=4e-3,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=seed,
    )
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args, **module)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    for entry in trainer.state.log_history:
        print(entry)
    print(f"trained {trainer.state.global_step} steps in {seconds:.1f} s "
          f"({seconds / max(trainer.state.global_step, 1):.2f} s per step)")

    emoji_only = 0
    for question in held_out:
        ids = tok(prompt(question), return_tensors="pt", return_token_type_ids=False)
        last = ids.input_ids.shape[-1] - 1
        _, out = reft_model.generate(
            ids,
            unit_locations={"sources->base": (None, [[[last]]])},
            intervene_on_prompt=True,
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
        )
        text = tok.decode(out[0][ids.input_ids.shape[-1]:], skip_special_tokens=True)
        emoji_only += text.strip() != "" and not any(c.isalpha() for c in text)
        print(f"{question} -> {text!r}")
    print(f"{emoji_only}/{len(held_out)} answers with the adapter have no letters")


if __name__ == "__main__":
    main()
