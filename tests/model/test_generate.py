"""Generation: replies end at a stop token or max length; `chat` driven through stdin."""

import subprocess
import sys

import torch
from helpers import ROOT

from phi3lit.data import tokenize_chat
from phi3lit.model.generate import generate_ids, left_pad, stop_ids
from phi3lit.model.module import Phi3LoRA

PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count from 1 to 30."}],
    [{"role": "user", "content": "Shout: sun moon"}],
]


def test_replies_end_at_stop_token_or_max_length(run_dir):
    module = Phi3LoRA.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt").eval()
    tok, model = module.tokenizer, module.model
    prompts = [tokenize_chat(p, tok, add_generation_prompt=True)["input_ids"] for p in PROMPTS]
    ids, mask = left_pad(prompts, 0)
    replies = generate_ids(model, tok, ids, mask, max_new_tokens=12)
    stops = set(stop_ids(tok))
    ended = 0
    for prompt, reply in zip(prompts, replies, strict=True):
        assert not stops & set(reply) and len(reply) <= 12
        if len(reply) < 12:  # then greedy decoding's next token must be a stop token
            with torch.no_grad():
                nxt = model(input_ids=torch.tensor([prompt + reply])).logits[0, -1].argmax().item()
            assert nxt in stops
            ended += 1
    assert ended >= 1  # the trained tiny model does learn to stop


def test_chat_through_stdin(run_dir):
    script = "What is 12 + 30?\n/system Answer briefly.\nCount from 4 to 9.\n/reset\nShout: sun\n"
    cmd = [sys.executable, "-m", "phi3lit", "chat", "--adapter", str(run_dir / "adapter"), "--max_new_tokens", "16"]
    proc = subprocess.run(cmd, input=script, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("assistant> ") == 3
    assert "(system prompt set; history cleared)" in out and "(history cleared)" in out
