"""The official `openai` client against `reft serve` (run by tests/serve.rs in a venv).

Usage: openai_client.py BASE_URL ADAPTER QUESTION MAX_TOKENS
Prints one JSON object with what each call returned; the Rust test checks the values.
"""

import json
import sys

import openai

base_url, adapter, question, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="test-key")
out = {"openai_version": openai.__version__}

models = client.models.list()
out["models"] = [(m.id, getattr(m, "parent", None)) for m in models.data]
base = models.data[0].id
messages = [{"role": "user", "content": question}]


def chat(model):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
            "completion_tokens": r.usage.completion_tokens, "object": r.object}


out["chat_base"] = chat(base)
out["chat_adapter"] = chat(adapter)

stream = client.chat.completions.create(model=adapter, messages=messages, max_tokens=max_tokens,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True})
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.choices:
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.completion_tokens
out["chat_adapter_stream"] = {"text": "".join(pieces), "finish": finish, "completion_tokens": usage,
                              "chunks": len(pieces)}

r = client.completions.create(model=base, prompt="The capital of France is", max_tokens=8, temperature=0)
out["completion"] = {"text": r.choices[0].text, "finish": r.choices[0].finish_reason,
                     "completion_tokens": r.usage.completion_tokens}
text = "".join(c.choices[0].text for c in client.completions.create(
    model=base, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
out["completion_stream"] = {"text": text}

try:
    client.chat.completions.create(model="no-such-adapter", messages=messages, max_tokens=2)
    out["unknown_model"] = "accepted"
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "message": e.body["message"] if isinstance(e.body, dict) else str(e)}

try:
    client.chat.completions.create(model=base, messages=messages, max_tokens=2, n=2)
    out["n2"] = "accepted"
except openai.BadRequestError as e:
    out["n2"] = {"status": e.status_code}

print(json.dumps(out))
