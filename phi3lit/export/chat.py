"""`python -m phi3lit chat --adapter DIR` (or `--model DIR`): talk to a fine-tune in the terminal.

The conversation is rendered with the chat template on every turn (so history is real context), replies are
decoded with the KV cache and streamed token by token, and stop at <|end|>. Commands: `/reset` forgets the
history, `/system <text>` sets the system prompt (and resets), `/quit` or end of input leaves.
"""

from __future__ import annotations

import sys

from phi3lit.data.pack import left_pad
from phi3lit.errors import ConfigError, missing_model
from phi3lit.hub import resolve_pretrained
from phi3lit.model.adapter import read_adapter_config
from phi3lit.model.generate import generate_ids


def load(adapter: str | None, model: str | None):
    """(model, tokenizer) from a peft adapter folder (base from its config) or a full model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if bool(adapter) == bool(model):
        raise ConfigError("chat: give exactly one of --adapter DIR or --model DIR")
    if adapter:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            resolve_pretrained(read_adapter_config(adapter, "--adapter")["base_model_name_or_path"])
        )
        try:
            return PeftModel.from_pretrained(base, adapter).eval(), AutoTokenizer.from_pretrained(adapter)
        except Exception as e:  # a truncated or foreign adapter_model.safetensors
            raise ConfigError(f"--adapter {adapter}: cannot load the adapter ({type(e).__name__}: {e})") from None
    path = resolve_pretrained(model)
    try:
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise missing_model(model, e) from None


def chat(
    adapter: str | None = None,
    model: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> None:
    """Interactive chat with a fine-tuned Phi-3.

    Args:
        adapter: a peft adapter folder written by `fit` or `export` (the base is read from its config).
        model: a full model folder (for example from `export --merge`) or hub id, instead of an adapter.
        system: system prompt to start with.
        max_new_tokens: reply length limit.
        temperature: 0 for greedy decoding, else sampling temperature.
        top_p: nucleus sampling threshold when sampling.
    """
    from transformers import TextStreamer

    from phi3lit.data import tokenize_chat

    lm, tok = load(adapter, model)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    print("phi3lit chat: /reset, /system <text>, /quit", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = [m for m in history if m["role"] == "system"]
            print("(history cleared)", flush=True)
            continue
        if text.startswith("/system"):
            prompt = text[len("/system") :].strip()
            history = [{"role": "system", "content": prompt}] if prompt else []
            print("(system prompt set; history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        prompt = tokenize_chat(history, tok, add_generation_prompt=True)["input_ids"]
        ids, mask = left_pad([prompt], tok.unk_token_id or 0)
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        (reply,) = generate_ids(lm, tok, ids, mask, max_new_tokens, temperature, top_p, streamer=streamer)
        sys.stdout.flush()
        history.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
